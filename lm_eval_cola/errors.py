"""Mistakes a user can fix, and how every command reports them: one line, no traceback.

Each error class that names a problem and its fix (a bad chain, a missing store, another
model's chains, ...) derives from :class:`ColaError` as well as from the built-in class it
always was, so ``except ValueError`` elsewhere keeps working. ``cola`` prints them as
``cola COMMAND: error: ...``; under the stock ``lm_eval`` CLI, :func:`install_excepthook`
does the same for any that reaches the top, where a traceback would bury the one line that
matters under lm-eval's frames.
"""

from __future__ import annotations

import sys
from types import TracebackType


class ColaError(Exception):
    """A problem the user can fix; the message names it and the fix."""


def one_line(error: BaseException) -> str:
    """The message on one line (a message of several lines joined with ``; ``)."""
    parts = [part.strip() for part in str(error).splitlines() if part.strip()]
    return "; ".join(parts) or type(error).__name__


def report(prog: str, error: BaseException) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit status to use (2)."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


def install_excepthook(prog: str) -> None:
    """Print a :class:`ColaError` that nothing caught as one line; leave the rest alone."""
    previous = sys.excepthook
    if getattr(previous, "_cola", False):
        return

    def excepthook(
        kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        if isinstance(error, ColaError):
            report(prog, error)
        else:
            previous(kind, error, trace)

    excepthook._cola = True
    sys.excepthook = excepthook
