"""The identity of a model's weights: every byte of every tensor, hashed fast.

Results and chains are only valid for the weights they were computed on, so stores, request
caches and predictor files all key on this fingerprint. It hashes the architecture (the config,
less where and how the model was loaded) and, for every tensor, its name, shape, dtype and every
byte, with xxHash's XXH3-128 (non-cryptographic, several GB/s on one core; docs/BENCHMARKS.md).
CPU tensors are hashed in place; GPU tensors are streamed to the host in chunks; tensors that
accelerate offloaded (the model holds them on the meta device) are read from where accelerate
keeps them, in memory or on disk. A tensor that can be read from nowhere is an error, never
skipped: a fingerprint that skipped it could not tell two checkpoints apart.

Fingerprints name their scheme (``xxh3:<32 hex digits>``). The releases before sampled 4,096
values per tensor and hashed offloaded tensors by shape alone (``sampled``: 64 hex digits, no
prefix); :func:`sampled_fingerprint` still computes that, so that what was stored under it can
be recognised and re-registered (``cola refingerprint``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from lm_eval_cola.errors import ColaError

SCHEME = "xxh3"
#: Bytes of a GPU tensor copied to the host at a time.
CHUNK_BYTES = 256 * 2**20
#: Config fields that name where or how a model was loaded, not what it computes.
_LOAD_FIELDS = ("_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation")
#: The ``sampled`` scheme's values per tensor.
_SAMPLES_PER_TENSOR = 4096


class FingerprintError(ColaError, ValueError):
    """Some of the weights cannot be read, so they cannot be fingerprinted."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a stored chain is valid for: these weights, under this name."""

    name: str
    revision: str | None
    architecture: str
    n_layers: int
    dtype: str
    fingerprint: str


def identify(model: nn.Module, name: str, revision: str | None, n_layers: int) -> ModelIdentity:
    config = model.config
    return ModelIdentity(
        name=name,
        revision=revision,
        architecture=getattr(config.get_text_config(), "model_type", config.model_type),
        n_layers=n_layers,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        fingerprint=model_fingerprint(model),
    )


def is_sampled(fingerprint: str) -> bool:
    """Whether a stored fingerprint was made by the earlier ``sampled`` scheme."""
    return ":" not in fingerprint


class ModelMismatchError(ColaError, ValueError):
    """Something stored was made for other weights than the loaded model's."""


def mismatch(what: str, name: str, fingerprint: str, loaded: ModelIdentity, option: str) -> str:
    """Why ``what`` (made for the model ``name`` with ``fingerprint``) does not fit the loaded
    model, and the fix (``option`` names it for ``cola refingerprint``); empty when it fits.
    The one wording of every "was this made for these weights?" check."""
    if fingerprint == loaded.fingerprint:
        return ""
    fix = reregister_hint(option) if is_sampled(fingerprint) else "load that model"
    return (
        f"{what} was made for {name} (fingerprint {fingerprint[:17]}), not for the loaded "
        f"{loaded.name} (fingerprint {loaded.fingerprint[:17]}); {fix}"
    )


def require_match(
    what: str,
    name: str,
    fingerprint: str,
    loaded: ModelIdentity,
    option: str,
    error: type[Exception] = ModelMismatchError,
) -> None:
    """Raise ``error`` with :func:`mismatch`'s message unless ``what`` fits the loaded model."""
    problem = mismatch(what, name, fingerprint, loaded, option)
    if problem:
        raise error(problem)


def reregister_hint(option: str) -> str:
    """What to tell a user whose stored results carry a ``sampled`` fingerprint: ``option``
    names them for ``cola refingerprint`` (e.g. ``--store cola.db``)."""
    return (
        "it was registered under the earlier 'sampled' weights fingerprint, which could miss a "
        "changed weight and is no longer matched; if it came from these weights, re-register "
        f"it: cola refingerprint --model_args '<the model args of this run>' {option}"
    )


def model_fingerprint(model: nn.Module) -> str:
    """``xxh3:`` and the XXH3-128 digest of the model's config and every byte of its tensors."""
    digest = xxhash.xxh3_128()
    digest.update(_config_text(model))
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            tensor = _offloaded(model, name)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        if flat.device.type == "cpu":
            digest.update(flat.contiguous().numpy())
            continue
        for start in range(0, flat.numel(), CHUNK_BYTES):
            digest.update(flat[start : start + CHUNK_BYTES].cpu().numpy())
    return f"{SCHEME}:{digest.hexdigest()}"


def _config_text(model: nn.Module) -> bytes:
    config = getattr(model, "config", None)
    if config is None:
        return b""
    fields = {k: v for k, v in config.to_dict().items() if k not in _LOAD_FIELDS}
    return json.dumps(fields, sort_keys=True, default=str).encode()


def _offloaded(model: nn.Module, name: str) -> torch.Tensor:
    """A tensor accelerate holds outside the model: from the ``weights_map`` of the offload
    hook on its module or on one of that module's parents."""
    path = name.split(".")
    modules = dict(model.named_modules())
    for depth in range(len(path) - 1, -1, -1):
        module = modules.get(".".join(path[:depth]))
        for hook in _hooks(getattr(module, "_hf_hook", None)):
            weights = getattr(hook, "weights_map", None)
            key = ".".join(path[depth:])
            if weights is not None and key in _keys(weights, path[:depth]):
                return weights[key]
    raise FingerprintError(
        f"weight '{name}' is on the meta device and no accelerate offload hook holds it, so "
        "the model cannot be fingerprinted; load it without offloading (or with accelerate's "
        "own device_map offloading) so that every weight can be read"
    )


def _hooks(hook) -> list:
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _keys(weights, prefix: list[str]) -> set[str]:
    """The keys a ``weights_map`` answers to, relative to its module (accelerate's prefixed
    maps list full names but are indexed without their prefix)."""
    start = ".".join(prefix) + "." if prefix else ""
    return {key.removeprefix(start) for key in weights.keys()}  # noqa: SIM118 (a Mapping)


def sampled_fingerprint(model: nn.Module) -> str:
    """The ``sampled`` scheme of earlier releases (see the module doc), to recognise it."""
    digest = hashlib.sha256()
    digest.update(_config_text(model))
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.is_meta:  # that scheme hashed offloaded tensors by shape and dtype alone
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _SAMPLES_PER_TENSOR:
            step = flat.numel() // _SAMPLES_PER_TENSOR
            flat = flat[::step][:_SAMPLES_PER_TENSOR]
        digest.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
