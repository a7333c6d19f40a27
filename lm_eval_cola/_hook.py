"""Register ``--model cola`` with lm-eval's model registry, for the stock ``lm_eval`` CLI.

lm-eval 0.4.13 reads no plugin entry points, so ``lm_eval_cola.pth`` imports this module at
interpreter start. It only installs an import watcher: when ``lm_eval.models`` (the module that
fills the registry with the built-in backends) has finished executing, ``cola`` is added as a
lazy placeholder. Nothing of lm-eval, torch or this package is imported before lm-eval itself
is, and the built-ins stay resolvable because registration happens after them.
"""

import sys

_WATCHED = "lm_eval.models"
_TARGET = "lm_eval_cola.lm:ColaLM"


def register() -> None:
    """Add the ``cola`` placeholder unless a backend of that name is already registered."""
    from lm_eval.api.registry import model_registry

    if "cola" not in model_registry:
        model_registry.register("cola", target=_TARGET)


class _Watcher:
    """A meta-path finder that runs :func:`register` right after ``lm_eval.models`` executes."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as err:  # never break lm-eval itself
                print(f"lm-eval-cola: could not register --model cola: {err}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


def register_now() -> None:
    """Register at once, importing lm-eval's built-in backends first (see the module doc)."""
    import lm_eval.models  # noqa: F401  (runs the watcher, or registers the built-ins)

    register()


def install() -> None:
    if _WATCHED in sys.modules:
        register()
    elif _Watcher not in sys.meta_path:
        sys.meta_path.insert(0, _Watcher)


install()
