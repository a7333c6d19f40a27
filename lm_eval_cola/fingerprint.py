"""A cheap, stable fingerprint of a model's weights.

Results and chains are only valid for the weights they were computed on. Hashing every byte
of an 8B model costs tens of seconds, so the fingerprint hashes the architecture and, for
every tensor, its name, shape, dtype and a fixed strided sample of its values. Any fine-tune,
re-quantisation or different checkpoint changes it; loading the same weights again does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

#: Values sampled from each tensor.
SAMPLES_PER_TENSOR = 4096
#: Config fields that name where or how a model was loaded, not what it computes.
_LOAD_FIELDS = ("_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation")


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


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest identifying the model's architecture and weights."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in _LOAD_FIELDS}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_sample_bytes(tensor))
    return digest.hexdigest()


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.is_meta:  # offloaded by accelerate: shape and dtype are all there is
        return b""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SAMPLES_PER_TENSOR:
        step = flat.numel() // SAMPLES_PER_TENSOR
        flat = flat[::step][:SAMPLES_PER_TENSOR]
    return flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
