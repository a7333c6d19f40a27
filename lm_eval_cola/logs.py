"""How every ``cola`` command logs: this package's notes, other libraries' only when asked,
each message once.

Libraries such as ``datasets`` and ``huggingface_hub`` print through handlers of their own and
also pass every record up to the root logger, so a root handler alone prints their messages
twice; the root handler here skips records a library's own handler has printed. Library INFO
chatter (Alembic's migrations, Optuna's "A new study created", lm-eval's task listing) is off
unless ``--verbosity INFO`` or ``DEBUG`` asks for it.
"""

from __future__ import annotations

import logging

#: This package's loggers: their INFO notes are shown at every verbosity.
OWN = ("lm_eval.cola", "lm_eval_cola")
#: Libraries whose messages follow ``--verbosity``.
LIBRARIES = (
    "accelerate",
    "alembic",
    "datasets",
    "filelock",
    "huggingface_hub",
    "lm_eval",
    "optuna",
    "sqlalchemy",
    "transformers",
)
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _NotPrintedYet(logging.Filter):
    """Pass a record only if no handler below the root (a library's own) has printed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            printing = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
            if any(record.levelno >= h.level for h in printing):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def setup(verbosity: str = "WARNING") -> None:
    """One handler on the root logger; other libraries at ``verbosity``, this package at INFO
    or below."""
    level = logging.getLevelName(verbosity.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(_NotPrintedYet())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    for name in OWN:
        logging.getLogger(name).setLevel(min(level, logging.INFO))
    import optuna  # its first import would set its own logger back to INFO

    optuna.logging.set_verbosity(level)
