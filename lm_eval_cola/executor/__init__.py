"""Run a Hugging Face causal LM through chains of its own decoder layers.

The executor does not re-implement any model's forward pass. It temporarily replaces the
decoder's layer list with one entry per chain position and lets the model's own ``forward``
and ``generate`` run unchanged. That keeps everything a model family does around its layers
(embedding scaling, per-layer-type masks and RoPE, final norm, logit soft-capping) exact, so
the identity chain is bit-identical to the stock model.

Two ways to apply chains:

- :meth:`ChainExecutor.apply`: one chain for the whole batch, for scoring and generation.
  Each chain position gets its own KV-cache slot: while position ``p`` runs, its layer's
  attention reports ``layer_idx = p``, and the config reports one layer (and one layer type)
  per position, so the cache holds ``len(chain)`` independent slots. A repeated layer therefore
  never reads or overwrites the keys and values of another pass through the same weights.
  Within it, :meth:`ChainExecutor.reuse_generation` resumes each forward step of a generation
  (the prompt's prefill, then each decoding step) from the deepest prefix of the chain already
  computed on the same tokens (:class:`GenerationReuse`).
- :meth:`ChainExecutor.apply_rows`: a different chain per row of a packed batch
  (:mod:`lm_eval_cola.packing`), for scoring. Each call runs one layer on every row that needs
  it (see :class:`RowsRun`); rows whose chain has ended pass through. With a
  :class:`PrefixCache`, a row resumes from the deepest prefix of its chain already computed on
  the same row, so over a search every distinct (chain prefix, token) is computed once.
"""

from lm_eval_cola.executor.chain_executor import (
    TESTED_MODEL_TYPES,
    ChainExecutor,
    UnsupportedModelError,
    find_decoder,
)
from lm_eval_cola.executor.prefix_cache import PrefixCache, return_freed_memory
from lm_eval_cola.executor.routing import MAX_ROUTED_RUNS, Routing
from lm_eval_cola.executor.work import Work

__all__ = [
    "MAX_ROUTED_RUNS",
    "TESTED_MODEL_TYPES",
    "ChainExecutor",
    "PrefixCache",
    "Routing",
    "UnsupportedModelError",
    "Work",
    "find_decoder",
    "return_freed_memory",
]
