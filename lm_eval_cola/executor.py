"""Run a Hugging Face causal LM through a chain of its own decoder layers.

The executor does not re-implement any model's forward pass. It temporarily replaces the
decoder's layer list with one entry per chain position and lets the model's own ``forward``
and ``generate`` run unchanged. That keeps everything a model family does around its layers
(embedding scaling, per-layer-type masks and RoPE, final norm, logit soft-capping) exact, so
the identity chain is bit-identical to the stock model.

Each chain position gets its own KV-cache slot: while position ``p`` runs, its layer's
attention reports ``layer_idx = p``, and the config reports one layer (and one layer type)
per position, so the cache holds ``len(chain)`` independent slots. A repeated layer therefore
never reads or overwrites the keys and values of another pass through the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from lm_eval_cola.chain import Chain, ChainError

#: Families whose forward loops over ``self.layers[: config.num_hidden_layers]`` and that the
#: test-suite checks on every supported transformers version.
TESTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"}
)


class UnsupportedModelError(ValueError):
    """The model's layout is not one the executor can re-sequence without changing its output."""


class PrefixCache:
    """Layer outputs by (input batch, chain prefix), least recently used first out, in bytes.

    Chains explored by a search share prefixes: a child differs from its parent from the edit
    onwards. For the same input batch, the output of position ``p`` depends only on the chain's
    first ``p + 1`` layers, so it can be looked up instead of computed. Only for scoring: a
    generating model also needs every layer's KV cache, which a looked-up output does not fill.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()

    def get(self, key: tuple):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: tuple, output) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(output))
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (output, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in (output if isinstance(output, tuple) else (output,)) if t is not None]


class _ChainPosition(nn.Module):
    """One chain position: calls a shared decoder layer under this position's cache index."""

    def __init__(
        self, layer: nn.Module, position: int, prefix: tuple[int, ...], executor: ChainExecutor
    ) -> None:
        super().__init__()
        # Plain attributes, not submodules: the wrapper must not own or re-register weights.
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "executor", executor)
        self.position = position
        self.prefix = prefix
        self._indexed = [
            m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)
        ]

    def forward(self, *args, **kwargs):
        cache, batch = self.executor.prefix_cache, self.executor.batch_key
        if cache is not None:
            output = cache.get((batch, self.prefix))
            if output is not None:
                return output
        output = self._run(*args, **kwargs)
        if cache is not None:
            cache.put((batch, self.prefix), output)
        return output

    def _run(self, *args, **kwargs):
        saved = [m.layer_idx for m in self._indexed]
        for module in self._indexed:
            module.layer_idx = self.position
        try:
            output = self.layer(*args, **kwargs)
        finally:
            for module, idx in zip(self._indexed, saved, strict=True):
                module.layer_idx = idx
        hidden = output[0] if isinstance(output, tuple) else output
        self.executor.layer_applications += hidden.shape[0]
        return output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model forwards read per-layer attributes such as ``attention_type``.
            return getattr(object.__getattribute__(self, "layer"), name)


class ChainExecutor:
    """Applies chains to one model; counts layer applications (rows × layers run)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = find_decoder(model)
        self.config = self.decoder.config
        self.layers: nn.ModuleList = self.decoder.layers
        self.n_layers = len(self.layers)
        self.layer_applications = 0
        self.prefix_cache: PrefixCache | None = None
        self.batch_key: str | None = None
        self._active = False

    def validate(self, chain: Chain, max_length: int | None = None) -> Chain:
        return chain.validate(self.n_layers, max_length)

    @contextlib.contextmanager
    def apply(self, chain: Chain | None, prefix_cache: PrefixCache | None = None) -> Iterator[None]:
        """Within the block, the model runs ``chain``; ``None`` leaves it untouched.

        With a ``prefix_cache``, layer outputs for a chain prefix already computed on the same
        input batch are looked up instead of computed (scoring only; see :class:`PrefixCache`).
        """
        if chain is None:
            yield
            return
        if self._active:
            raise RuntimeError("a chain is already applied to this model; chains do not nest")
        chain.check_range(self.n_layers)
        positions = nn.ModuleList(
            _ChainPosition(self.layers[layer], pos, chain.layers[: pos + 1], self)
            for pos, layer in enumerate(chain)
        )
        saved = _swap_config(self.config, chain)
        self.decoder._modules["layers"] = positions
        hook = None
        if prefix_cache is not None:
            hook = self.decoder.register_forward_pre_hook(self._key_batch, with_kwargs=True)
        self.prefix_cache, self._active = prefix_cache, True
        try:
            yield
        finally:
            self.decoder._modules["layers"] = self.layers
            _restore_config(self.config, saved)
            if hook is not None:
                hook.remove()
            self.prefix_cache, self.batch_key, self._active = None, None, False

    def _key_batch(self, _module, args, kwargs) -> None:
        """Identify the decoder's input batch: cached layer outputs are only valid for it."""
        digest = hashlib.blake2b(digest_size=16)
        inputs = [args[0] if args else kwargs.get("input_ids")]
        inputs += [kwargs.get(name) for name in ("attention_mask", "position_ids", "inputs_embeds")]
        for tensor in inputs:
            if tensor is None:
                digest.update(b"-")
            else:
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        self.batch_key = digest.hexdigest()

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


def _swap_config(config, chain: Chain) -> dict:
    """Make the config describe the chain: one layer, and one layer type, per position."""
    saved = {"num_hidden_layers": config.num_hidden_layers}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) < max(chain) + 1:
            raise ChainError(
                f"config.layer_types has {len(layer_types)} entries, chain '{chain}' needs more"
            )
        saved["layer_types"] = layer_types
        config.layer_types = [layer_types[i] for i in chain]
    config.num_hidden_layers = len(chain)
    return saved


def _restore_config(config, saved: dict) -> None:
    for key, value in saved.items():
        setattr(config, key, value)
