"""A generation under a chain, each forward step resumed from the chain prefixes computed on
the same tokens (:class:`GenerationReuse`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import xxhash
from torch import nn

from lm_eval_cola.executor.positions import ChainPosition, kv_cache
from lm_eval_cola.executor.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from lm_eval_cola.executor.chain_executor import ChainExecutor


@dataclass(frozen=True)
class StepState:
    """One forward step of a generation (the prompt's prefill, or one decoding step) up to one
    chain position: the arguments of every position's KV-cache ``update`` call in the step so
    far, and the hidden state this position output. Entries of one step share the updates of
    their common prefix, so each counts only its own."""

    updates: tuple[tuple[tuple, dict], ...]
    output: torch.Tensor

    @property
    def nbytes(self) -> int:
        args, kwargs = self.updates[-1]
        own = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        return self.output.nbytes + sum(tensor.nbytes for tensor in own)


class GenerationReuse:
    """One ``generate`` call under the applied chain, every forward step resumed from a prefix
    cache.

    A step's output at position ``p`` depends only on the tokens so far (the prompt and the
    tokens generated before the step) and the chain's first ``p + 1`` layers: the KV-cache
    slots it reads were written by the same prefix on the same tokens. So each step is filed
    under a key naming that token history, chained from the prompt's key over each step's input
    (:func:`_step_key`), and resumes from the deepest prefix of the chain stored there. Chains
    of a search share their prefix's prompt prefill, and, for as long as they have generated
    the same tokens, their prefix's decoding steps too.

    The first ``found`` positions of a step are not computed: each replays its stored KV-cache
    update (so its slot holds exactly what computing it would have left there), and the last of
    them hands on its stored output. The positions after run as usual, and what each leaves is
    stored. A layer whose attention does not make exactly one cache update (none, or shared
    caches) is computed, and the rest of that step is not stored.
    """

    def __init__(self, executor: ChainExecutor, cache: PrefixCache, key: str) -> None:
        self.executor, self.cache, self.key = executor, cache, key
        self.chain = executor.chain
        self.positions = [
            ChainPosition(executor.layers[layer], p, executor) for p, layer in enumerate(self.chain)
        ]
        #: the key of each decoding step so far (a search's physical limit counts them)
        self.decode_keys: list[str] = []
        self._steps = 0

    def layer_at(self, position: int) -> nn.Module:
        return self.positions[position].layer

    def step(self, p: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        position = self.positions[p]
        if p == 0:
            self.executor.work.forward_calls += 1
            self._begin(hidden)
        if p < self.found:
            update_args, update_kwargs = self.updates[p]
            kv_cache(kwargs).update(*update_args, **update_kwargs)
            output = self.output if p == self.found - 1 else hidden
            return (output,) if self.executor.layers_return_tuples else output
        calls: list[tuple[tuple, dict]] = []
        with _recording_updates(kv_cache(kwargs), calls):
            result = position.run(hidden, args, kwargs)
        # known before any position is replayed: replays need a stored, computed output
        self.executor.layers_return_tuples = isinstance(result, tuple)
        self.storable &= len(calls) == 1
        if self.storable:
            self.updates.append(calls[0])
            output = result[0] if isinstance(result, tuple) else result
            prefix = self.chain.layers[: p + 1]
            self.cache.put(self.key, prefix, StepState(tuple(self.updates), output))
        return result

    def _begin(self, hidden: torch.Tensor) -> None:
        """A new forward step: its key, and what the cache holds of it."""
        if self._steps:
            self.key = _step_key(self.key, hidden)
            self.decode_keys.append(self.key)
        self._steps += 1
        self.found, resume = self.cache.deepest(self.key, self.chain)
        self.updates: list[tuple[tuple, dict]] = list(resume.updates) if resume else []
        self.output = resume.output if resume else None
        self.storable = True


def _step_key(previous: str, hidden: torch.Tensor) -> str:
    """The key of a decoding step: the previous step's key and this step's input (the new
    tokens' embeddings, which the first layer receives)."""
    digest = xxhash.xxh3_128(previous.encode())
    digest.update(repr((tuple(hidden.shape), hidden.dtype)).encode())
    digest.update(hidden.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return f"step:{digest.hexdigest()}"


@contextlib.contextmanager
def _recording_updates(kv, calls: list[tuple[tuple, dict]]) -> Iterator[None]:
    """Within the block, every ``update`` call on the cache ``kv`` is noted in ``calls``."""
    if kv is None:
        yield
        return
    update = kv.update

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return update(*args, **kwargs)

    kv.update = recording
    try:
        yield
    finally:
        del kv.update
