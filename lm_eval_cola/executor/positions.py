"""What the decoder's layer list holds while chains run: one entry per chain position.

A :class:`ChainPosition` calls a shared layer under its position's KV-cache index; a
:class:`RunPosition` hands its call to a run that decides, per call, which layer runs where
(rows with chains of their own, a routed chain, a generation resumed from a prefix cache).
No entry owns or re-registers weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache

if TYPE_CHECKING:
    from lm_eval_cola.executor.chain_executor import ChainExecutor


class PositionRun(Protocol):
    """A forward pass that decides, per call of a position, what runs there."""

    def step(self, position: int, hidden: torch.Tensor, args: tuple, kwargs: dict): ...

    def layer_at(self, position: int) -> nn.Module: ...


class ChainPosition(nn.Module):
    """One chain position: calls a shared decoder layer under this position's cache index."""

    def __init__(self, layer: nn.Module, position: int, executor: ChainExecutor) -> None:
        super().__init__()
        # Plain attributes, not submodules: the wrapper must not own or re-register weights.
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "executor", executor)
        self.position = position
        self._indexed = [
            m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)
        ]

    def forward(self, hidden_states, *args, **kwargs):
        self.executor.work.forward_calls += self.position == 0
        return self.run(hidden_states, args, kwargs)

    def run(self, hidden_states, args: tuple, kwargs: dict):
        """The layer itself, its attention writing to this position's KV-cache slot."""
        kv = kv_cache(kwargs)
        decoding = kv is not None and kv.get_seq_length(self.position) > 0
        saved = [m.layer_idx for m in self._indexed]
        for module in self._indexed:
            module.layer_idx = self.position
        try:
            output = self.layer(hidden_states, *args, **kwargs)
        finally:
            for module, idx in zip(self._indexed, saved, strict=True):
                module.layer_idx = idx
        work, tokens = self.executor.work, hidden_states.shape[0] * hidden_states.shape[1]
        work.layer_calls += 1
        work.layer_applications += hidden_states.shape[0]
        work.token_layer_applications += tokens
        work.decode_token_layers += tokens if decoding else 0
        return output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model forwards read per-layer attributes such as ``attention_type``.
            return getattr(object.__getattribute__(self, "layer"), name)


class RunPosition(nn.Module):
    """One position of a forward pass that decides per call which layer runs where (a
    :class:`~.rows.RowsRun`, a :class:`~.routing.Routing` or a
    :class:`~.generation.GenerationReuse`): it hands each call to its run's ``step``."""

    def __init__(self, position: int, run: PositionRun) -> None:
        super().__init__()
        object.__setattr__(self, "run", run)
        self.position = position

    def forward(self, hidden_states, *args, **kwargs):
        return self.run.step(self.position, hidden_states, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model forwards read per-layer attributes such as ``attention_type``; all layers
            # a position may run share its layer type, so any of them answers.
            return getattr(object.__getattribute__(self, "run").layer_at(self.position), name)


def kv_cache(kwargs: dict):
    """The KV cache a decoder layer was handed (``cache`` in transformers 5, else
    ``past_key_values``), or ``None``."""
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)
