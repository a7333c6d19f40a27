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

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import xxhash
from torch import nn
from transformers.cache_utils import Cache

from lm_eval_cola.chain import Chain, ChainError
from lm_eval_cola.errors import ColaError

#: Families whose forward loops over ``self.layers[: config.num_hidden_layers]`` and that the
#: test-suite checks on every supported transformers version.
TESTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"}
)


#: Rows a layer runs on at one position are packed into sequences of up to this many tokens
#: (or the longest row's), one call for all: a call's fixed cost is that of tens of tokens on a
#: CPU, while attention within a sequence grows with its square.
SEQUENCE_TOKENS = 256


class UnsupportedModelError(ColaError, ValueError):
    """The model's layout is not one the executor can re-sequence without changing its output."""


@dataclass
class Work:
    """Compute spent by decoder layers.

    ``layer_applications`` counts rows x layers; ``token_layer_applications`` counts token
    positions x layers, the real measure of work (a row of a packed document holds all its
    requests). Totals include padding, which ``padding_token_layers`` counts apart.
    """

    layer_applications: int = 0
    token_layer_applications: int = 0
    padding_token_layers: int = 0
    forward_calls: int = 0
    #: token-layers of generation's decoding steps (after the prompt's prefill), counted apart
    #: because they run one token at a time
    decode_token_layers: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Work)))

    def __sub__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(Work)))


class Stored(Protocol):
    """What the prefix cache holds: a layer output (a tensor) or a :class:`StepState`."""

    @property
    def nbytes(self) -> int: ...


class PrefixCache:
    """Work done on a row under chain prefixes, by (row content, chain prefix), least recently
    used out.

    Chains explored by a search share prefixes: a child differs from its parent from the edit
    onwards. For the same row, the output of position ``p`` depends only on the chain's first
    ``p + 1`` layers, so a row resumes from the deepest prefix found here. A packed scoring row
    stores its output there; a generation's forward step stores a :class:`StepState`, which
    also holds what every position wrote to the KV cache.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Stored] = OrderedDict()

    def deepest(self, row: str, chain: Chain) -> tuple[int, Stored | None]:
        """(positions already computed, what they left) for ``chain`` on ``row``."""
        for length in range(len(chain), 0, -1):
            output = self._entries.get((row, chain.layers[:length]))
            if output is not None:
                self._entries.move_to_end((row, chain.layers[:length]))
                self.hits += 1
                return length, output
        self.misses += 1
        return 0, None

    def put(self, row: str, prefix: tuple[int, ...], value: Stored) -> None:
        size = value.nbytes
        if size > self.max_bytes or (row, prefix) in self._entries:
            return
        self._entries[(row, prefix)] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class Rows(Protocol):
    """A left-padded batch of rows (:class:`lm_eval_cola.packing.PackedBatch`)."""

    lengths: list[int]
    keys: list[str]
    width: int
    device: torch.device

    def allowed(self, window: int | None) -> torch.Tensor: ...


class _ChainPosition(nn.Module):
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
        reuse = self.executor.generation
        if reuse is not None:
            return reuse.step(self, hidden_states, args, kwargs)
        return self.run(hidden_states, args, kwargs)

    def run(self, hidden_states, args: tuple, kwargs: dict):
        """The layer itself, its attention writing to this position's KV-cache slot."""
        kv = _kv_cache(kwargs)
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
        #: the key of each decoding step so far (a search's physical limit counts them)
        self.decode_keys: list[str] = []
        self._steps = 0

    def step(self, position: _ChainPosition, hidden: torch.Tensor, args: tuple, kwargs: dict):
        p = position.position
        if p == 0:
            self._begin(hidden)
        if p < self.found:
            update_args, update_kwargs = self.updates[p]
            _kv_cache(kwargs).update(*update_args, **update_kwargs)
            output = self.output if p == self.found - 1 else hidden
            return (output,) if self.executor.layers_return_tuples else output
        calls: list[tuple[tuple, dict]] = []
        with _recording_updates(_kv_cache(kwargs), calls):
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


def _kv_cache(kwargs: dict):
    """The KV cache a decoder layer was handed (``cache`` in transformers 5, else
    ``past_key_values``), or ``None``."""
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


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
        self._positions: dict[int, _ChainPosition] = {}

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
            self._positions[position] = _ChainPosition(layer, position, self.executor)
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


class _RunPosition(nn.Module):
    """One position of a forward pass that decides per call which layer runs where (a
    :class:`RowsRun` or a :class:`Routing`): it hands each call to its run's ``step``."""

    def __init__(self, position: int, run: RowsRun | Routing) -> None:
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
        """Every row's remaining positions, the layer most rows need next first."""
        for r, output in enumerate(self.resume):
            if output is not None:
                hidden[r, hidden.shape[1] - self.rows.lengths[r] :] = output
        done = list(self.start)
        while True:
            waiting: dict[int, list[int]] = {}
            for r, chain in enumerate(self.chains):
                if done[r] < len(chain):
                    waiting.setdefault(chain.layers[done[r]], []).append(r)
            if not waiting:
                return
            layer, rows = max(waiting.items(), key=lambda item: (len(item[1]), -item[0]))
            self._run_layer(layer, rows, done, hidden, args, kwargs)
            for r in rows:
                done[r] += 1

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


class ChainExecutor:
    """Applies chains to one model and counts the work its layers do."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = find_decoder(model)
        self.config = self.decoder.config
        self.layers: nn.ModuleList = self.decoder.layers
        self.n_layers = len(self.layers)
        self.work = Work()
        #: whether decoder layers return a tuple (transformers 4.x) or a tensor (5.x); the
        #: probe in :meth:`check` finds out
        self.layers_return_tuples: bool | None = None
        #: the chain :meth:`apply` applies, and the generation reusing steps within it
        self.chain: Chain | None = None
        self.generation: GenerationReuse | None = None
        self._active = False

    def validate(self, chain: Chain, max_length: int | None = None) -> Chain:
        return chain.validate(self.n_layers, max_length)

    @contextlib.contextmanager
    def apply(self, chain: Chain | None) -> Iterator[None]:
        """Within the block, the model runs ``chain``; ``None`` leaves it untouched."""
        if chain is None:
            yield
            return
        chain.check_range(self.n_layers)
        positions = [_ChainPosition(self.layers[layer], p, self) for p, layer in enumerate(chain)]
        with self._swapped(positions, [self._layer_type(layer) for layer in chain]):
            self.chain = chain
            try:
                yield
            finally:
                self.chain = None

    @contextlib.contextmanager
    def reuse_generation(self, cache: PrefixCache, prompt: str) -> Iterator[GenerationReuse]:
        """Within the block (one ``generate`` call under :meth:`apply`'s chain), each forward
        step resumes from the deepest prefix of the chain computed on the same tokens, the
        prompt named by ``prompt`` (a key for its tokens and padding), and stores what it
        computes (:class:`GenerationReuse`)."""
        if self.chain is None:
            raise RuntimeError("reuse_generation needs a chain applied (ChainExecutor.apply)")
        self.generation = GenerationReuse(self, cache, prompt)
        try:
            yield self.generation
        finally:
            self.generation = None

    @contextlib.contextmanager
    def route(self, decide: Callable[[int, torch.Tensor], int]) -> Iterator[Routing]:
        """Within the block, the chain is decided during the first forward pass, layer by
        layer, by ``decide(layer, hidden entering it)`` (see :class:`Routing`); one prompt at a
        time, on models with one layer type."""
        if self.layers_return_tuples is None:
            self.check()
        types = set(getattr(self.config, "layer_types", None) or ())
        if len(types) > 1:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} mixes layer types ({', '.join(sorted(types))}): "
                "a routed chain must know each position's type before the forward pass runs"
            )
        routing = Routing(self, decide)
        positions = [_RunPosition(p, routing) for p in range(self.n_layers * MAX_ROUTED_RUNS)]
        with self._swapped(positions, [next(iter(types), None)] * len(positions)):
            yield routing

    @contextlib.contextmanager
    def apply_rows(
        self,
        rows: Rows,
        chains: Sequence[Chain],
        cache: PrefixCache | None = None,
        share_calls: bool = False,
    ) -> Iterator[RowsRun]:
        """Within the block, row ``r`` of a packed batch runs ``chains[r]`` (scoring only:
        call the model without a KV cache). All chains must share :meth:`signature`.

        Each row runs in layer calls of its own, so its results are bit for bit those of the
        row alone (CPU BLAS rounds a row differently in a product of more rows);
        ``share_calls`` runs a layer's rows in one call, packed end to end, for speed (see
        :class:`RowsRun`).
        """
        if self.layers_return_tuples is None:
            self.check(rows.device)
        if len({self.signature(chain) for chain in chains}) > 1:
            raise ValueError("rows of one batch must share a layer-type signature")
        for chain in chains:
            chain.check_range(self.n_layers)
        run = RowsRun(self, rows, chains, cache, share_calls)
        longest = max(chains, key=len)
        types = [self._layer_type(longest.layers[p]) for p in range(len(longest))]
        with self._swapped([_RunPosition(p, run) for p in range(len(longest))], types):
            yield run

    def signature(self, chain: Chain) -> tuple:
        """What rows of one mixed batch must share: the layer type at every position, for
        models with several (their forward picks each position's mask and RoPE by type)."""
        types = getattr(self.config, "layer_types", None)
        if types is None or len(set(types)) <= 1:
            return ()
        return tuple(types[layer] for layer in chain)

    def sliding_window(self, layer: nn.Module) -> int | None:
        """The sliding window of a layer's attention: the attention's own (families with
        per-layer types), else the config's, which such families apply to every layer."""
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "sliding_window"):
            return attention.sliding_window
        return getattr(self.config, "sliding_window", None)

    def _layer_type(self, layer: int) -> str | None:
        types = getattr(self.config, "layer_types", None)
        if types is None:
            return None
        if len(types) <= layer:
            raise ChainError(
                f"config.layer_types has {len(types)} entries, layer {layer} needs more"
            )
        return types[layer]

    @contextlib.contextmanager
    def _swapped(self, positions: list[nn.Module], types: list[str | None]) -> Iterator[None]:
        """The decoder runs ``positions`` as its layers, and its config describes them."""
        if self._active:
            raise RuntimeError("a chain is already applied to this model; chains do not nest")
        saved = {"num_hidden_layers": self.config.num_hidden_layers}
        if getattr(self.config, "layer_types", None) is not None:
            saved["layer_types"] = self.config.layer_types
            self.config.layer_types = types
        self.config.num_hidden_layers = len(positions)
        self.decoder._modules["layers"] = nn.ModuleList(positions)
        self._active = True
        try:
            yield
        finally:
            self.decoder._modules["layers"] = self.layers
            for key, value in saved.items():
                setattr(self.config, key, value)
            self._active = False

    def check(self, device: torch.device | str | None = None) -> None:
        """Prove on a 2-token input that the model's forward really walks the swapped list.

        ``device`` is where inputs go (the model's own device by default; with accelerate's
        offloading, parameters may sit on the meta device while inputs must not).
        """
        probe = Chain((self.n_layers - 1, 0, 0))
        seen: list[int] = []
        hooks = [
            layer.register_forward_pre_hook(lambda _m, _a, i=i: seen.append(i))
            for i, layer in enumerate(self.layers)
        ]
        hooks.append(self.layers[0].register_forward_hook(self._note_output_kind))
        device = device or getattr(self.model, "device", "cpu")
        try:
            with torch.no_grad(), self.apply(probe):
                self.model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
        finally:
            for hook in hooks:
                hook.remove()
        if seen != list(probe):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not run its layers through "
                f"'{type(self.decoder).__name__}.layers' in order (probe chain {list(probe)} "
                f"ran {seen}); chains cannot be applied to it without changing its output"
            )

    def _note_output_kind(self, _module, _args, output) -> None:
        self.layers_return_tuples = isinstance(output, tuple)


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder-layer list (``model.model`` for HF causal LMs)."""
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):
            candidates.append(get_decoder())
    candidates += [getattr(model, "model", None), model]
    for candidate in candidates:
        if isinstance(getattr(candidate, "layers", None), nn.ModuleList) and hasattr(
            candidate, "config"
        ):
            return candidate
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder-layer list at 'model.model.layers'; "
        "lm-eval-cola supports decoder-only Hugging Face models with the standard layout "
        f"(tested: {', '.join(sorted(TESTED_MODEL_TYPES))})"
    )
