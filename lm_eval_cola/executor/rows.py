"""Rows of a packed batch, each with a chain of its own, in few layer calls (scoring)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor.prefix_cache import PrefixCache
from lm_eval_cola.executor.work import Work

if TYPE_CHECKING:
    from lm_eval_cola.executor.chain_executor import ChainExecutor

#: Rows a layer runs on at one position are packed into sequences of up to this many tokens
#: (or the longest row's), one call for all: a call's fixed cost is that of tens of tokens on a
#: CPU, while attention within a sequence grows with its square.
SEQUENCE_TOKENS = 256


class Rows(Protocol):
    """A left-padded batch of rows (:class:`lm_eval_cola.packing.PackedBatch`)."""

    lengths: list[int]
    keys: list[str]
    width: int
    device: torch.device

    def allowed(self, window: int | None) -> torch.Tensor: ...


class RowsRun:
    """The state of one forward pass over rows with chains of their own.

    Row ``r`` of a left-padded batch occupies its last ``lengths[r]`` columns. A row starts at
    the deepest prefix of its chain in the prefix cache; every position it computes is stored
    there. ``work[r]`` is the compute spent on row ``r`` (its real tokens only).

    Each call of a layer reads all its weights, however few tokens it runs on, so the fewer the
    calls, the faster. When the model hands every layer the same arguments (one layer type), a
    row's position does not matter to a call: the first position runs everything, each call
    running one layer on every row that needs it next, wherever that is in its chain. Models
    with several layer types pick each position's mask and RoPE by type, so there rows advance
    a position at a time, each distinct layer running once per position.
    """

    def __init__(
        self,
        executor: ChainExecutor,
        rows: Rows,
        chains: Sequence[Chain],
        cache: PrefixCache | None,
        share_calls: bool,
    ) -> None:
        self.executor, self.rows, self.chains, self.cache = executor, rows, list(chains), cache
        self.share_calls = share_calls
        self.across_positions = all(executor.signature(chain) == () for chain in self.chains)
        self.work = [Work() for _ in self.chains]
        self.start, self.resume = [], []
        for key, chain in zip(rows.keys, self.chains, strict=True):
            found, output = cache.deepest(key, chain) if cache is not None else (0, None)
            self.start.append(found)
            self.resume.append(output)

    def layer_at(self, position: int) -> nn.Module:
        chain = next(c for c in self.chains if len(c) > position)
        return self.executor.layers[chain.layers[position]]

    def step(self, position: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        if position == 0:
            self.executor.work.forward_calls += 1
            hidden = hidden.clone()  # written in place below; the embedding output stays intact
            if self.across_positions:
                self._run_all(hidden, args, kwargs)
        if not self.across_positions:
            self._run_position(position, hidden, args, kwargs)
        return (hidden,) if self.executor.layers_return_tuples else hidden

    def _run_all(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Every row's remaining positions, in the calls :func:`layer_calls` orders."""
        for r, output in enumerate(self.resume):
            if output is not None:
                hidden[r, hidden.shape[1] - self.rows.lengths[r] :] = output
        for layer, rows, positions in layer_calls(self.chains, self.start):
            self._run_layer(layer, rows, positions, hidden, args, kwargs)

    def _run_position(self, position: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Every row's layer at ``position``, each distinct layer once."""
        by_layer: dict[int, list[int]] = {}
        for r, chain in enumerate(self.chains):
            if self.start[r] == position + 1:  # its output at this position is in the cache
                hidden[r, hidden.shape[1] - self.rows.lengths[r] :] = self.resume[r]
            elif self.start[r] <= position < len(chain):
                by_layer.setdefault(chain.layers[position], []).append(r)
        for layer, rows in sorted(by_layer.items()):
            self._run_layer(layer, rows, [position] * len(self.chains), hidden, args, kwargs)

    def _run_layer(
        self, layer: int, rows: list[int], positions: list[int], hidden, args, kwargs
    ) -> None:
        """Layer ``layer`` on ``rows``, row ``r`` at chain position ``positions[r]``: in one
        call, packed into few sequences (:class:`_Packing`), or a call a row."""
        for group in [rows] if self.share_calls else [[row] for row in rows]:
            self._call(layer, group, positions, hidden, args, kwargs)

    def _call(
        self, layer: int, rows: list[int], positions: list[int], hidden, args, kwargs
    ) -> None:
        module = self.executor.layers[layer]
        packing = _Packing(rows, self.rows.lengths, hidden.shape[1], hidden.device)
        allowed = self.rows.allowed(self.executor.sliding_window(module))
        packed = {
            name: packing.mask(allowed, hidden.dtype)
            if name == "attention_mask"
            else packing.take(value)
            for name, value in kwargs.items()
        }
        output = module(packing.take(hidden), *args, **packed)
        packing.put(hidden, output[0] if isinstance(output, tuple) else output)
        total, lengths, width = self.executor.work, self.rows.lengths, hidden.shape[1]
        total.layer_calls += 1
        total.layer_applications += len(rows)
        total.token_layer_applications += packing.size
        total.padding_token_layers += packing.padding
        for r in rows:
            position = positions[r]
            self.work[r].layer_applications += 1
            self.work[r].token_layer_applications += lengths[r]
            if self.cache is not None:
                state = hidden[r, width - lengths[r] :].clone()
                self.cache.put(self.rows.keys[r], self.chains[r].layers[: position + 1], state)


def layer_calls(
    chains: Sequence[Chain], start: Sequence[int]
) -> Iterator[tuple[int, list[int], list[int]]]:
    """The layer calls that run each chain on from its ``start`` position, rows of one layer
    together: (layer, its rows, every row's chain position at the call).

    Each call reads all of a layer's weights, so the order should keep rows together (the
    fewest calls would be a shortest common supersequence of the chains, NP-hard). A chain of
    skips and repeats is a series of ascending runs, so the lowest layer any row needs next
    goes first: a row that fell behind (a repeat, or a later start in the prefix cache) catches
    up while the others wait at the next layer they share, and a row that skipped ahead waits
    for them (running the layer most rows need next instead takes 1.24x the calls for 16
    chains of a search). Looking one call further, the second-lowest layer goes first where
    that takes fewer calls in all, each option counted by going on lowest first after it
    (:func:`lowest_first_calls`): about 9% fewer calls again on the passes of a search
    (``benchmarks/layer_calls.py``), at one count of the rest a call."""
    done = list(start)
    remaining = lowest_first_calls(chains, done)  # what the order chosen so far will take
    while waiting := rows_by_next_layer(chains, done):
        layer, *others = sorted(waiting)
        if others:
            instead = 1 + lowest_first_calls(chains, _advanced(done, waiting[others[0]]))
            if instead < remaining:
                layer, remaining = others[0], instead
        yield layer, waiting[layer], list(done)
        done = _advanced(done, waiting[layer])
        remaining -= 1


def lowest_first_calls(chains: Sequence[Chain], done: Sequence[int]) -> int:
    """The calls that running the lowest layer any row needs next takes from ``done`` on
    (``done[r]`` positions of row ``r``'s chain run): a heap of the layers rows wait at, a
    step a row's position, cheap enough to count at every call of a pass."""
    done = list(done)
    waiting = rows_by_next_layer(chains, done)
    heap = list(waiting)
    heapq.heapify(heap)
    calls = 0
    while heap:
        calls += 1
        for r in waiting.pop(heapq.heappop(heap)):
            done[r] += 1
            if done[r] < len(chains[r]):
                layer = chains[r].layers[done[r]]
                if layer not in waiting:
                    waiting[layer] = []
                    heapq.heappush(heap, layer)
                waiting[layer].append(r)
    return calls


def _advanced(done: Sequence[int], rows: list[int]) -> list[int]:
    """``done`` after a call that ran ``rows``."""
    after = list(done)
    for r in rows:
        after[r] += 1
    return after


def rows_by_next_layer(chains: Sequence[Chain], done: Sequence[int]) -> dict[int, list[int]]:
    """The rows not at their chain's end yet, by the layer each needs next (``done[r]``
    positions of row ``r``'s chain run)."""
    waiting: dict[int, list[int]] = {}
    for r, chain in enumerate(chains):
        if done[r] < len(chain):
            waiting.setdefault(chain.layers[done[r]], []).append(r)
    return waiting


class _Packing:
    """Rows of a left-padded batch laid end to end in few sequences, for one layer call.

    Rows go first-fit, longest first, into sequences of :data:`SEQUENCE_TOKENS` tokens (or the
    longest row's); a row attends only within itself, so the result is each row's own. Per-token
    arguments (hidden states, positions, RoPE tables) are gathered into the same layout.
    """

    def __init__(self, rows: list[int], lengths: list[int], width: int, device) -> None:
        if len(rows) == 1:  # the common case: the row's own columns, as views
            (self.row,) = rows
            self.width, self.span = width, lengths[self.row]
            self.size, self.padding = self.span, 0
            return
        self.row = None
        capacity = max(SEQUENCE_TOKENS, *(lengths[r] for r in rows))
        sequences: list[list[int]] = []
        fills: list[int] = []
        for row in sorted(rows, key=lambda r: -lengths[r]):
            free = next(
                (s for s, fill in enumerate(fills) if fill + lengths[row] <= capacity), None
            )
            if free is None:
                sequences.append([])
                fills.append(0)
                free = len(fills) - 1
            sequences[free].append(row)
            fills[free] += lengths[row]
        span = max(fills)
        row_of = torch.full((len(sequences), span), -1, dtype=torch.long)
        column_of = torch.zeros((len(sequences), span), dtype=torch.long)
        for s, members in enumerate(sequences):
            start = 0
            for row in members:
                row_of[s, start : start + lengths[row]] = row
                column_of[s, start : start + lengths[row]] = torch.arange(
                    width - lengths[row], width
                )
                start += lengths[row]
        self.width, self.span = width, span
        self.size, self.padding = row_of.numel(), row_of.numel() - sum(fills)
        self.real = (row_of >= 0).to(device)
        self.rows, self.columns = row_of.clamp(min=0).to(device), column_of.to(device)

    def take(self, value):
        """The packed layout of a per-token argument; anything else passes unchanged."""
        if isinstance(value, tuple):
            return tuple(self.take(item) for item in value)
        if isinstance(value, torch.Tensor):
            if value.dim() == 1 and value.shape[0] == self.width:  # cache positions
                return torch.arange(self.span, device=value.device)
            if value.dim() >= 2 and value.shape[1] == self.width:
                if self.row is not None:
                    first = self.row if value.shape[0] > 1 else 0
                    return value[first : first + 1, self.width - self.span :]
                return value[self.rows if value.shape[0] > 1 else 0, self.columns]
        return value

    def mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (S, 1, span, span) mask: each token sees what ``allowed`` (B, T, T) lets it
        see within its own row; slack positions see only themselves."""
        if self.row is not None:
            rows = slice(self.row, self.row + 1)
            ok = allowed[rows, self.width - self.span :, self.width - self.span :]
            additive = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
            return additive.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]
        queries, keys = (self.rows[:, :, None], self.columns[:, :, None]), self.columns[:, None, :]
        ok = allowed[queries[0], queries[1], keys] & (queries[0] == self.rows[:, None, :])
        ok &= self.real[:, :, None] & self.real[:, None, :]
        ok |= torch.eye(self.span, dtype=torch.bool, device=ok.device)
        additive = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
        return additive.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]

    def put(self, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Write the packed output back into each row of ``hidden``."""
        if self.row is not None:
            hidden[self.row, self.width - self.span :] = output[0]
            return
        hidden[self.rows[self.real], self.columns[self.real]] = output[self.real]
