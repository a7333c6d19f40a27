"""Applies chains to one model: swaps the decoder's layer list, keeps the model's own forward."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lm_eval_cola.chain import Chain, ChainError
from lm_eval_cola.errors import ColaError
from lm_eval_cola.executor.decoding import DecodeStep
from lm_eval_cola.executor.generation import GenerationReuse
from lm_eval_cola.executor.positions import ChainPosition, RunPosition
from lm_eval_cola.executor.prefix_cache import PrefixCache
from lm_eval_cola.executor.routing import MAX_ROUTED_RUNS, Routing
from lm_eval_cola.executor.rows import Rows, RowsRun
from lm_eval_cola.executor.work import Work

#: Families whose forward loops over ``self.layers[: config.num_hidden_layers]`` and that the
#: test-suite checks on every supported transformers version.
TESTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"}
)


class UnsupportedModelError(ColaError, ValueError):
    """The model's layout is not one the executor can re-sequence without changing its output."""


class ChainExecutor:
    """Applies chains to one model and counts the work its layers do."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = find_decoder(model)
        self.config = self.decoder.config
        self.layers: nn.ModuleList = self.decoder.layers
        self.n_layers = len(self.layers)
        self.work = Work()
        #: whether the model's forward can compute logits at the last positions only
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        #: whether decoder layers return a tuple (transformers 4.x) or a tensor (5.x); the
        #: probe in :meth:`check` finds out
        self.layers_return_tuples: bool | None = None
        #: the chain :meth:`apply` applies
        self.chain: Chain | None = None
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
        positions = [ChainPosition(self.layers[layer], p, self) for p, layer in enumerate(chain)]
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
        reuse = GenerationReuse(self, cache, prompt)
        applied = self.decoder._modules["layers"]
        positions = [RunPosition(p, reuse) for p in range(len(self.chain))]
        self.decoder._modules["layers"] = nn.ModuleList(positions)
        try:
            yield reuse
        finally:
            self.decoder._modules["layers"] = applied

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
        positions = [RunPosition(p, routing) for p in range(self.n_layers * MAX_ROUTED_RUNS)]
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
        with self._swapped([RunPosition(p, run) for p in range(len(longest))], types):
            yield run

    @contextlib.contextmanager
    def apply_decoding(self, step: DecodeStep) -> Iterator[None]:
        """Within the block (one forward pass of :class:`~.decoding.BatchedDecoding`), row
        ``r`` runs ``step.chains[r]`` against its generation's own KV cache. All chains must
        share :meth:`signature`."""
        if self.layers_return_tuples is None:
            self.check()
        longest = max(step.chains, key=len)
        types = [self._layer_type(layer) for layer in longest]
        with self._swapped([RunPosition(p, step) for p in range(len(longest))], types):
            yield

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
