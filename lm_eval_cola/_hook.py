"""Register ``--model cola`` and this package's tasks with lm-eval, for the stock ``lm_eval`` CLI.

lm-eval 0.4.13 reads no plugin entry points, so ``lm_eval_cola.pth`` imports this module at
interpreter start. It only installs an import watcher: when ``lm_eval.models`` (the module that
fills the registry with the built-in backends) has finished executing, ``cola`` is added as a
lazy placeholder; when ``lm_eval.tasks.manager`` has, every ``TaskManager`` also indexes
``lm_eval_cola/task_configs`` (``arc_easy_gen``, ``arc_challenge_gen``, ``gsm8k_direct``), so
``lm_eval --tasks arc_easy_gen`` needs no ``--include_path``, and lm-eval's own task index is
read from a cache instead of parsed again (:mod:`lm_eval_cola.task_cache`); when the CLI's
configuration module has, ``--model cola``'s arguments are checked as soon as they are read and
this package's errors print as one line (:func:`register_cli`). Nothing of lm-eval, torch or this
package is imported before lm-eval itself is, and the built-ins stay resolvable because
registration happens after them.
"""

import functools
import inspect
import sys
from pathlib import Path

_TARGET = "lm_eval_cola.lm:ColaLM"
#: This package's lm-eval task folder.
TASKS_DIR = Path(__file__).parent / "task_configs"


def register() -> None:
    """Add the ``cola`` placeholder unless a backend of that name is already registered."""
    from lm_eval.api.registry import model_registry

    if "cola" not in model_registry:
        model_registry.register("cola", target=_TARGET)


def register_tasks() -> None:
    """Make every ``TaskManager`` index :data:`TASKS_DIR` after lm-eval's own tasks and before
    the user's ``include_path`` (whose tasks of the same name win, as later paths do)."""
    from lm_eval.tasks.manager import TaskManager

    original = TaskManager.__init__
    if getattr(original, "_cola_tasks", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("include_defaults", True):
            given = bound.arguments.get("include_path") or []
            given = list(given) if isinstance(given, list | tuple) else [given]
            bound.arguments["include_path"] = [str(TASKS_DIR), *given]
        original(*bound.args, **bound.kwargs)

    __init__._cola_tasks = True
    TaskManager.__init__ = __init__

    from lm_eval_cola import task_cache

    task_cache.install()


def register_cli() -> None:
    """Check ``--model cola``'s arguments as soon as the ``lm_eval`` CLI has read them, before it
    indexes tasks or loads weights, and print this package's errors as one line.

    ``EvaluatorConfig`` is where lm-eval's CLI (and only its CLI) turns its arguments into one
    configuration; its public constructors ``from_cli`` and ``from_config`` are wrapped.
    """
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from lm_eval_cola.errors import install_excepthook

    install_excepthook("lm_eval")
    for name in ("from_cli", "from_config"):
        original = getattr(EvaluatorConfig, name).__func__
        if not getattr(original, "_cola_checked", False):
            setattr(EvaluatorConfig, name, classmethod(_preflighted(original)))


def _preflighted(build):
    @functools.wraps(build)
    def checked(cls, *args, **kwargs):
        config = build(cls, *args, **kwargs)
        if config.model == "cola":
            from lm_eval_cola.model_args import preflight

            preflight(config.model_args or {})
        return config

    checked._cola_checked = True
    return checked


#: Module -> what to run right after it executes.
_WATCHED = {
    "lm_eval.models": register,
    "lm_eval.tasks.manager": register_tasks,
    "lm_eval.config.evaluate_config": register_cli,
}


class _Watcher:
    """A meta-path finder that runs a registration right after its module executes."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        action = _WATCHED.get(fullname)
        if action is None:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                action()
            except Exception as err:  # never break lm-eval itself
                print(f"lm-eval-cola: could not register with lm-eval: {err}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


def register_now() -> None:
    """Register at once, importing lm-eval's built-in backends first (see the module doc)."""
    # importing runs the watchers (or the built-ins are already registered)
    import lm_eval.config.evaluate_config
    import lm_eval.models
    import lm_eval.tasks.manager  # noqa: F401

    register()
    register_tasks()
    register_cli()


def install() -> None:
    for name, action in _WATCHED.items():
        if name in sys.modules:
            action()
    if _Watcher not in sys.meta_path:
        sys.meta_path.insert(0, _Watcher)


install()
