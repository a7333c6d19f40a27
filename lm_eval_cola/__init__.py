"""lm-eval-cola: run, search and store per-sample chains of decoder layers in lm-eval.

Kept import-free: ``lm_eval_cola.pth`` imports ``lm_eval_cola._hook`` in every interpreter
of the environment, so this package must cost nothing until it is used.
"""

__version__ = "0.1.0"
__all__ = ["Chain", "ChainError"]


def __getattr__(name: str):
    if name in __all__:
        from lm_eval_cola import chain

        return getattr(chain, name)
    raise AttributeError(f"module 'lm_eval_cola' has no attribute {name!r}")
