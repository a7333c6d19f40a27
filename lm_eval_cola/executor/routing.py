"""A chain decided layer by layer while the prompt runs (Dr.LLM's routers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor.positions import ChainPosition

if TYPE_CHECKING:
    from lm_eval_cola.executor.chain_executor import ChainExecutor

#: A routed chain runs each layer at most this many times in a row (Dr.LLM: skip, execute,
#: repeat once).
MAX_ROUTED_RUNS = 2


class Routing:
    """A chain decided layer by layer while the model's first forward pass (a prompt) runs.

    Layers are visited in order. Before layer ``i`` first runs, ``decide(i, hidden)`` sees
    the hidden state entering it and says how many times it runs: 0 (skip), 1 or 2 (repeat
    once, Dr.LLM's actions). The chain so built occupies the first positions, each with its
    own KV-cache slot exactly as under :meth:`ChainExecutor.apply`; the positions after it pass
    the hidden state through untouched and write no cache. Later forward passes (decoding
    steps) run the decided chain, so a routed generation is that of its chain given outright.
    """

    def __init__(self, executor: ChainExecutor, decide: Callable[[int, torch.Tensor], int]):
        self.executor, self.decide = executor, decide
        self.layers: list[int] = []
        self._next, self._owed = 0, 0  # the next layer to decide on; runs still owed
        self._decided = False
        self._positions: dict[int, ChainPosition] = {}

    @property
    def chain(self) -> Chain:
        """The chain decided so far (all of it once the first forward pass is over)."""
        return Chain.derived(tuple(self.layers))

    def layer_at(self, position: int) -> nn.Module:
        return self.executor.layers[0]  # routing needs one layer type

    def step(self, position: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        if not self._decided:
            self._extend(hidden)
            self._decided = position == self.executor.n_layers * MAX_ROUTED_RUNS - 1
        if position >= len(self.layers):
            return (hidden,) if self.executor.layers_return_tuples else hidden
        if position not in self._positions:
            layer = self.executor.layers[self.layers[position]]
            self._positions[position] = ChainPosition(layer, position, self.executor)
        return self._positions[position].run(hidden, args, kwargs)

    def _extend(self, hidden: torch.Tensor) -> None:
        """Decide until a layer owes a run at this position, or no layer is left."""
        if hidden.shape[0] != 1:
            raise ValueError(f"a routed chain is decided for one prompt, not {hidden.shape[0]}")
        while not self._owed and self._next < self.executor.n_layers:
            runs = int(self.decide(self._next, hidden))
            if not 0 <= runs <= MAX_ROUTED_RUNS:
                raise ValueError(f"a router chose {runs} runs of layer {self._next}: 0, 1 or 2")
            self._next, self._owed = self._next + 1, runs
        if self._owed:
            self.layers.append(self._next - 1)
            self._owed -= 1
