"""Greedy decoding of many generations at once, each under a chain of its own, every row's
bits independent of what shares its calls (the batch-invariant mode).

A search decodes hundreds of short generations, each under another chain. Decoded one chain
at a time, every step reads all weights for a single token; decoded together, one call of a
layer serves every generation that needs that layer next, wherever it is in its chain (as
packed scoring rows do, :class:`~.rows.RowsRun`). That is only exact if a row's arithmetic
does not depend on its company, which ``benchmarks/batch_invariance.py`` measured on this CPU:

- linear layers (projections, MLP, LM head) give a row the same bits in any call whose rows
  are a multiple of :data:`ROW_TILE` (the kernel works in tiles of 4 rows; a row of a partial
  last tile takes another path in calls of under 12 rows), so a call lays its rows' tokens end
  to end in whole tiles (:class:`_Packed`): decoding steps' tokens side by side, a prompt
  left-padded to a multiple of 4 tokens, the call filled up to a multiple with copies (and
  the LM head's call of each row's last position, too);
- norms, rotary embeddings, activations and the softmax are row-invariant as they are;
- attention is not invariant to how far a row's KV cache is padded (the reductions over keys
  change their order), so each row attends over its cache padded to its own length rounded up
  to :data:`KEY_BUCKET` keys, never to its company's: :func:`bucketed_attention`, registered
  with transformers' ``AttentionInterface`` and run with the family's own eager attention
  (soft-capping and all), a call per prompt or per one-token rows of one bucket.

A row's padding depends on its own length only, so prompts of any lengths share a call, and
so do prompts and decoding steps: a generation that starts while others decode is prefilled
in their decoding step's forward pass (:meth:`BatchedDecoding.step`), which a search uses to
start each document's next chain as soon as its last one has finished.

So a generation gives the same tokens decoded alone, beside other chains or other documents,
resumed from a prefix cache or computed afresh. On CUDA the same two rules apply;
:func:`bucketed_attention` is the one place where a batch-invariant kernel library's
attention would go.

Each generation keeps its KV cache per chain position (a repeated layer never shares a slot).
With a :class:`PrefixCache`, every forward step of a generation (its prompt's prefill, then each
decoding step, named by the tokens so far) resumes from the deepest prefix of its chain already
computed on the same tokens, replaying what those positions wrote to the KV cache
(:class:`DecodeState`): chains of a search share their prefixes' prefill and, for as long as
they generated the same tokens, their decoding steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import xxhash
from torch import nn
from transformers import AttentionInterface

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor.prefix_cache import PrefixCache
from lm_eval_cola.executor.rows import RowsRun
from lm_eval_cola.executor.work import Work

if TYPE_CHECKING:
    from lm_eval_cola.executor.chain_executor import ChainExecutor

#: A decoding call's rows are a multiple of this, so that a row's bits do not depend on the
#: call's size (measured on this CPU, docs/BENCHMARKS.md).
ROW_TILE = 4
#: A row attends over its KV cache padded to a multiple of this many keys.
KEY_BUCKET = 32
#: The attention implementation this mode registers with transformers.
ATTENTION = "cola_batch_invariant"
#: Generations decoded together by default.
ROWS_PER_STEP = 32


@dataclass(eq=False)
class Generation:
    """One greedy generation: a prompt's tokens under a chain, and what it has done so far."""

    prompt: list[int]
    chain: Chain
    max_new_tokens: int
    #: the texts that end it once its decoded tokens hold one (read by ``finished``)
    stop: Sequence[str] = ()
    #: the tokens generated so far
    tokens: list[int] = field(default_factory=list)
    #: keep each step's logits in :attr:`logits` (for checks: a vocabulary's worth a token)
    keep_logits: bool = False
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: the compute spent on it
    work: Work = field(default_factory=Work)
    #: the key of each decoding step (the tokens so far), what a search's limit counts
    step_keys: list[str] = field(default_factory=list)
    #: the key of the tokens in its KV cache
    key: str = ""
    #: tokens in its KV cache
    length: int = 0
    #: its KV cache: (keys, values) per chain position, room for every token it may see in
    #: whole key buckets, zeros after its tokens (so its keys padded to its bucket are a view)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def write(self, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append a step's (heads, tokens, dim) keys and values at a chain position."""
        if position not in self.cache:
            room = _bucket(len(self.prompt) + self.max_new_tokens)
            shape = (keys.shape[0], room, keys.shape[-1])
            self.cache[position] = (keys.new_zeros(shape), values.new_zeros(shape))
        stored_keys, stored_values = self.cache[position]
        stored_keys[:, self.length : self.length + keys.shape[1]] = keys
        stored_values[:, self.length : self.length + keys.shape[1]] = values


@dataclass(frozen=True)
class DecodeState:
    """One forward step of a generation at one chain position (under the chain's prefix up to
    it): the keys and values the position wrote to the KV cache, and its output. Each entry
    holds its own tensors only, so the prefix cache's memory count is exact; resuming reads the
    entries of every shallower prefix too (:meth:`DecodeStep._resume`)."""

    keys: torch.Tensor
    values: torch.Tensor
    output: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.output.nbytes + self.keys.nbytes + self.values.nbytes


class BatchedDecoding:
    """Decodes generations greedily, up to ``rows_per_step`` at a time, as they come: each
    :meth:`step` is one forward pass (per layer-type signature) that takes every active
    generation's next decoding step and the prompts of those admitted now, side by side, so a
    generation submitted while others decode is prefilled within their steps, not in a pass
    of its own. ``finished(generation)`` says when one stops (its stop sequences, EOS, its
    length)."""

    def __init__(
        self,
        executor: ChainExecutor,
        finished: Callable[[Generation], bool],
        cache: PrefixCache | None = None,
        rows_per_step: int = ROWS_PER_STEP,
    ) -> None:
        self.executor, self.finished, self.cache = executor, finished, cache
        self.rows_per_step = max(rows_per_step, 1)
        self.cache_argument = _cache_argument(executor.layers[0])
        self.waiting: deque[Generation] = deque()
        self.active: list[Generation] = []

    def submit(self, generations: Sequence[Generation]) -> None:
        """Queue generations; a later :meth:`step` admits them as rows free up."""
        for generation in generations:
            generation.chain.check_range(self.executor.n_layers)
        self.waiting.extend(generations)

    @property
    def unfinished(self) -> int:
        """Generations waiting or under way."""
        return len(self.waiting) + len(self.active)

    @property
    def room(self) -> int:
        """Generations the next step could take without any waiting: its rows left empty."""
        return max(self.rows_per_step - self.unfinished, 0)

    def step(self) -> list[Generation]:
        """One forward step: the active generations' next tokens, and the prompts of as many
        waiting ones as there is room for; returns those that finished (their KV caches
        freed)."""
        admitted = []
        while self.waiting and len(self.active) + len(admitted) < self.rows_per_step:
            admitted.append(self.waiting.popleft())
        for generation in self.active:
            generation.key = _step_key(generation.key, generation.tokens[-1])
            generation.step_keys.append(generation.key)
        for generation in admitted:
            generation.key = _prompt_key(generation.prompt)
        inputs = {g: [g.tokens[-1]] for g in self.active} | {g: g.prompt for g in admitted}
        for group in self._by_signature(self.active + admitted):
            self._forward(group, [inputs[g] for g in group])
        self.active += admitted
        finished = [g for g in self.active if self._finished(g)]
        for generation in finished:
            self.active.remove(generation)
            generation.cache.clear()
        return finished

    def run(
        self, generations: Sequence[Generation], done: Callable[[Generation], None] | None = None
    ) -> None:
        """Decode every generation; ``done`` hears of each as it finishes."""
        self.submit(generations)
        while self.unfinished:
            for generation in self.step():
                if done is not None:
                    done(generation)

    def _finished(self, generation: Generation) -> bool:
        return len(generation.tokens) >= generation.max_new_tokens or self.finished(generation)

    def _by_signature(self, generations: list[Generation]) -> list[list[Generation]]:
        groups: dict[tuple, list[Generation]] = {}
        for generation in generations:
            groups.setdefault(self.executor.signature(generation.chain), []).append(generation)
        return list(groups.values())

    @torch.no_grad()
    def _forward(self, generations: list[Generation], inputs: list[list[int]]) -> None:
        """One forward step of ``generations`` on their new ``inputs``, each under its chain;
        appends each one's greedy next token. The batch is left-padded to the longest prompt
        (the layer calls take each row's own tokens, :class:`_Packed`) and gets copies of its
        first row, so that the LM head, which reads each row's last position only, sees whole
        tiles."""
        step = DecodeStep(self, generations, [len(tokens) for tokens in inputs])
        width = step.rows.width
        rows = [(g.length, tokens) for g, tokens in zip(generations, inputs, strict=True)]
        rows += rows[:1] * _filler(len(rows))
        device = self.executor.model.device
        ids = torch.tensor([[tokens[0]] * (width - len(tokens)) + tokens for _, tokens in rows])
        positions = torch.tensor(
            [[max(start + t - width + len(tokens), start) for t in range(width)]
             for start, tokens in rows]
        )  # fmt: skip
        keep = {"logits_to_keep": 1} if self.executor.keeps_logits else {}
        with self.executor.apply_decoding(step), _attention(self.executor.config):
            logits = self.executor.model(
                input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False,
                **keep,
            ).logits  # fmt: skip
        for generation, tokens, row in zip(generations, inputs, logits[:, -1], strict=False):
            generation.length += len(tokens)
            generation.tokens.append(int(row.argmax()))
            if generation.keep_logits:
                generation.logits.append(row.clone())


@dataclass(frozen=True)
class _Tokens:
    """The new tokens of one forward step, as :class:`~.rows.RowsRun` sees its rows."""

    lengths: list[int]
    keys: list[str]
    width: int
    device: torch.device


class DecodeStep(RowsRun):
    """One forward step of generations with chains of their own: :class:`~.rows.RowsRun`'s
    order of layer calls (each call one layer on every generation that needs it next), each
    call reading and writing the generations' KV caches (:class:`_CacheView`)."""

    def __init__(self, decoding: BatchedDecoding, generations: list[Generation], new: list[int]):
        executor = decoding.executor
        width = 1 if max(new) == 1 else _tiled(max(new))
        tokens = _Tokens(new, [g.key for g in generations], width, executor.model.device)
        super().__init__(executor, tokens, [g.chain for g in generations], None, True)
        self.decoding, self.generations = decoding, generations
        self.cache = decoding.cache
        #: each row's keys padded to a whole bucket; a call's, to its longest row's
        self.buckets = [_bucket(g.length + n) for g, n in zip(generations, new, strict=True)]
        self.key_length = max(self.buckets)
        self._masks: dict[int | None, torch.Tensor] = {}
        for r, generation in enumerate(generations):
            self._resume(r, generation)

    def _resume(self, r: int, generation: Generation) -> None:
        """Start after the deepest prefix of the chain whose every position is stored for these
        tokens: replay what each position wrote, hand on the last one's output."""
        states = [] if self.cache is None else self.cache.path(generation.key, self.chains[r])
        for position, state in enumerate(states):
            generation.write(position, state.keys, state.values)
        self.start[r], self.resume[r] = len(states), states[-1].output if states else None

    def _call(self, layer: int, rows: list[int], positions: list[int], hidden, args, kwargs):
        module = self.executor.layers[layer]
        # decoding rows first, those of one key bucket side by side (they share an attention
        # call), then the prompts
        lengths = self.rows.lengths
        rows = sorted(rows, key=lambda r: (lengths[r] > 1, self.buckets[r]))
        packed = _Packed(rows, lengths, self.rows.width, self.buckets, hidden.device)
        view = _CacheView(
            [self.generations[r] for r in rows],
            [positions[r] for r in rows],
            [lengths[r] for r in rows],
            packed.spans,
            max(self.buckets[r] for r in rows),
        )
        mask = self._mask(self.executor.sliding_window(module), hidden)
        arguments = {name: packed.take(value) for name, value in kwargs.items()}
        arguments["attention_mask"] = packed.take(mask[:, 0, :, : view.key_length])[:, None]
        arguments[self.decoding.cache_argument] = view
        token = _PACKED.set(packed)
        try:
            output = module(packed.take(hidden), *args, **arguments)
        finally:
            _PACKED.reset(token)
        packed.put(hidden, output[0] if isinstance(output, tuple) else output)
        self._account(rows, positions, view, hidden, packed)

    def _mask(self, window: int | None, like: torch.Tensor) -> torch.Tensor:
        """Additive (rows, 1, width, keys) mask of the step's rows: a new token sees the tokens
        before it and itself (within ``window`` on a sliding-window layer), nothing of the
        padding; a padding query (before a row's new tokens) sees key 0 only."""
        if window not in self._masks:
            starts = torch.tensor([g.length for g in self.generations])
            new, width = torch.tensor(self.rows.lengths), self.rows.width
            keys = torch.arange(self.key_length)
            queries = starts[:, None] + torch.arange(width)[None, :] - (width - new)[:, None]
            queries = queries.masked_fill(queries < starts[:, None], 0)
            visible = keys[None, None, :] <= queries[:, :, None]
            if window is not None:
                visible &= queries[:, :, None] - keys[None, None, :] < window
            additive = torch.zeros(visible.shape, dtype=like.dtype)
            additive.masked_fill_(~visible, torch.finfo(like.dtype).min)
            self._masks[window] = additive[:, None].to(like.device)
        return self._masks[window]

    def _account(self, rows, positions, view: _CacheView, hidden, packed: _Packed) -> None:
        """Count the call's work (padding apart); store what each row's position did."""
        width, lengths, total = self.rows.width, self.rows.lengths, self.executor.work
        real = sum(lengths[r] for r in rows)
        total.layer_calls += 1
        total.layer_applications += len(rows)
        total.token_layer_applications += packed.size
        total.padding_token_layers += packed.size - real
        for i, r in enumerate(rows):
            work = self.generations[r].work
            work.layer_applications += 1
            work.token_layer_applications += lengths[r]
            if self.generations[r].tokens:  # a decoding step, not a prompt
                work.decode_token_layers += lengths[r]
                total.decode_token_layers += lengths[r]
            if self.cache is not None:
                prefix = self.chains[r].layers[: positions[r] + 1]
                output = hidden[r, width - lengths[r] :].clone()
                state = DecodeState(*view.written[i], output)
                self.cache.put(self.generations[r].key, prefix, state)


class _Packed:
    """The tokens of one layer call, laid end to end in one sequence: each row's new tokens,
    its one token (a decoding step, or a prompt of one token) or left-padded to whole tiles of
    :data:`ROW_TILE` (a longer prompt), then copies of the first token that fill the call to
    whole tiles. A row's bits thus do not depend on its company's lengths, so nobody pads to
    the longest prompt, and a step's prompts and decoding steps share one forward pass.

    Per-token arguments (hidden states, positions, RoPE tables, the mask) are gathered into
    this layout; :func:`bucketed_attention` reads :attr:`spans` to attend each row over its own
    KV cache."""

    def __init__(
        self, rows: list[int], lengths: list[int], width: int, buckets: list[int], device
    ) -> None:
        self.width = width
        sizes = [1 if lengths[r] == 1 else _tiled(lengths[r]) for r in rows]
        #: each row's (start, stop) in the call
        self.spans: list[tuple[int, int]] = []
        index_rows, index_columns = [], []
        for r, size in zip(rows, sizes, strict=True):
            start = len(index_rows)
            self.spans.append((start, start + size))
            index_rows += [r] * size
            index_columns += range(width - size, width)
        self.real = len(index_rows)
        filler = -self.real % ROW_TILE
        index_rows += index_rows[:1] * filler
        index_columns += index_columns[:1] * filler
        self.size = len(index_rows)
        #: runs of rows that attend in one call: the one-token rows of one key bucket, or a
        #: prompt alone, as (first, last row + 1, bucket)
        self.attention_runs: list[tuple[int, int, int]] = []
        for i, r in enumerate(rows):
            run = self.attention_runs[-1] if self.attention_runs else None
            alike = run is not None and run[2] == buckets[r] and sizes[run[0]] == 1
            if sizes[i] == 1 and alike:
                self.attention_runs[-1] = (run[0], i + 1, run[2])
            else:
                self.attention_runs.append((i, i + 1, buckets[r]))
        self.rows = torch.tensor(index_rows, device=device)
        self.columns = torch.tensor(index_columns, device=device)

    def take(self, value):
        """The packed layout of a per-token argument: (1, tokens, ...) for a (rows, width, ...)
        one, (tokens,) for cache positions; anything else passes unchanged."""
        if isinstance(value, tuple):
            return tuple(self.take(item) for item in value)
        if isinstance(value, torch.Tensor):
            if value.dim() == 1 and value.shape[0] == self.width:  # cache positions
                return value[self.columns]
            if value.dim() >= 2 and value.shape[1] == self.width:
                if value.shape[0] == 1:  # shared by every row
                    return value[:, self.columns]
                return value[self.rows, self.columns][None]
        return value

    def put(self, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Write the call's (1, tokens, hidden) output back into each row of ``hidden``."""
        real = slice(0, self.real)
        hidden[self.rows[real], self.columns[real]] = output[0, real]


#: The packing of the layer call in progress, for :func:`bucketed_attention`.
_PACKED: contextvars.ContextVar[_Packed] = contextvars.ContextVar("cola_packed_call")


class _CacheView:
    """What one layer call's attention sees as its KV cache: each row's own cache at its chain
    position. ``update`` appends each row's new tokens (the last ``new[i]`` of its span in the
    packed call) and returns every row's cache padded to ``key_length`` keys
    (:func:`bucketed_attention` cuts each row's back to its own bucket)."""

    def __init__(
        self,
        generations: list[Generation],
        positions: list[int],
        new: list[int],
        spans: list[tuple[int, int]],
        key_length: int,
    ) -> None:
        self.generations, self.positions, self.new, self.spans = generations, positions, new, spans
        self.key_length = key_length
        #: the (keys, values) of its new tokens each row wrote
        self.written: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, *_args, **_kwargs):
        rows = list(zip(self.generations, self.positions, self.new, self.spans, strict=True))
        for generation, position, new, (_, stop) in rows:
            written = keys[0, :, stop - new : stop], values[0, :, stop - new : stop]
            generation.write(position, *written)
            self.written.append((written[0].clone(), written[1].clone()))
        stored = [generation.cache[position] for generation, position, _, _ in rows]
        return self._padded([k for k, _ in stored]), self._padded([v for _, v in stored])

    def _padded(self, caches: list[torch.Tensor]) -> torch.Tensor:
        """The rows' (heads, room, dim) caches as one (rows, heads, key_length, dim) tensor: a
        cache is zero after its tokens, so it needs padding only where its room is shorter."""
        length = self.key_length
        return torch.stack(
            [
                cache[:, :length] if cache.shape[1] >= length
                else torch.nn.functional.pad(cache, (0, 0, 0, length - cache.shape[1]))
                for cache in caches
            ]
        )  # fmt: skip


def bucketed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The family's own eager attention over a packed call (:class:`_Packed`): each row's
    queries over its own keys, padded to its bucket (a multiple of :data:`KEY_BUCKET`), so a
    row's reductions over keys have the same length whatever else is in the call; the
    one-token rows of one bucket in one call, a prompt's in a call of its own. The filler's
    outputs are zeros."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    packed = _PACKED.get()
    parts = []
    for first, last, bucket in packed.attention_runs:
        (start, _), (_, stop) = packed.spans[first], packed.spans[last - 1]
        queries, mask = query[0, :, start:stop], attention_mask[0, :, start:stop, :bucket]
        if stop - start == last - first:  # one query a row: the rows side by side as a batch
            queries, mask = queries.transpose(0, 1)[:, :, None], mask.transpose(0, 1)[:, :, None]
        else:  # a prompt's queries, a batch of one
            queries, mask = queries[None], mask[None]
        part, _ = eager(
            module,
            queries.contiguous(),
            key[first:last, :, :bucket],
            value[first:last, :, :bucket],
            mask,
            scaling=scaling,
            dropout=dropout,
            **kwargs,
        )
        parts.append(part.reshape(1, stop - start, *part.shape[2:]))
    filler = packed.size - packed.real
    if filler:
        parts.append(parts[0].new_zeros(1, filler, *parts[0].shape[2:]))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


AttentionInterface.register(ATTENTION, bucketed_attention)


@contextlib.contextmanager
def _attention(config) -> Iterator[None]:
    """Within the block, the model's attention is :func:`bucketed_attention`."""
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def _tiled(tokens: int) -> int:
    """``tokens`` rounded up to whole tiles of :data:`ROW_TILE`."""
    return -(-tokens // ROW_TILE) * ROW_TILE


def _filler(rows: int) -> int:
    """Copies of a row that make a call of ``rows`` a multiple of :data:`ROW_TILE`."""
    return -rows % ROW_TILE


def _bucket(length: int) -> int:
    return -(-length // KEY_BUCKET) * KEY_BUCKET


def _cache_argument(layer: nn.Module) -> str:
    """The name under which a decoder layer takes its KV cache (it changed across
    transformers releases)."""
    parameters = inspect.signature(layer.forward).parameters
    return next(
        name for name in ("cache", "past_key_values", "past_key_value") if name in parameters
    )


def _prompt_key(prompt: list[int]) -> str:
    digest = xxhash.xxh3_128(b"invariant-prompt")
    digest.update(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes())
    return f"invariant:{digest.hexdigest()}"


def _step_key(previous: str, token: int) -> str:
    """The key of a decoding step: the previous step's and the token it reads."""
    digest = xxhash.xxh3_128(previous.encode())
    digest.update(token.to_bytes(8, "little"))
    return f"invariant:{digest.hexdigest()}"
