"""Chains of layers: the value every other module passes around.

A chain is the sequence of decoder-layer indices a sample runs through. Skips, repeats and
re-orderings are all allowed. Its canonical text form is built to survive lm-eval's
comma-separated ``--model_args``: tokens are joined with ``.``, a token is a layer ``7``,
an inclusive range ``0-11`` (``11-8`` runs downwards) and may end in ``xK`` to repeat
that token K times (``4-7x2`` is ``4.5.6.7.4.5.6.7``). ``0-11.11-29`` repeats layer 11 once.
JSON lists (``[0, 1, 1, 2]``) are accepted everywhere a chain is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lm_eval_cola.errors import ColaError

#: A chain may be at most this many times as long as the model is deep, unless told otherwise.
DEFAULT_MAX_LENGTH_FACTOR = 4

_TOKEN = re.compile(r"^(?P<start>\d+)(?:-(?P<end>\d+))?(?:x(?P<times>\d+))?$")
_SYNTAX_HELP = (
    "write layers as '.'-separated tokens: an index '7', an inclusive range '0-11' "
    "(or '11-8' downwards), optionally repeated with 'xK' ('4-7x2'); "
    "for example '0-11.11-29', or a JSON list '[0, 1, 1, 2]'"
)


class ChainError(ColaError, ValueError):
    """A chain that cannot be parsed or does not fit the model; the message names the fix."""


@dataclass(frozen=True)
class Chain:
    """An immutable sequence of decoder-layer indices."""

    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ChainError("empty chain: a chain needs at least one layer; " + _SYNTAX_HELP)
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ChainError(f"layer {layer!r} is not an integer; " + _SYNTAX_HELP)
            if layer < 0:
                raise ChainError(f"layer {layer} is negative: layer indices start at 0")

    @classmethod
    def derived(cls, layers: tuple[int, ...]) -> Chain:
        """A chain of indices taken from valid chains (a search action's result), made without
        checking them again: a search makes hundreds of candidates per step."""
        chain = object.__new__(cls)
        object.__setattr__(chain, "layers", layers)
        return chain

    @classmethod
    def identity(cls, n_layers: int) -> Chain:
        """The model's own order, ``0 .. n_layers-1``."""
        return cls(tuple(range(n_layers)))

    @classmethod
    def parse(cls, spec: str | int | Sequence[int] | Chain) -> Chain:
        """Read a chain from its text form, a JSON list, a list of ints or a lone index."""
        if isinstance(spec, Chain):
            return spec
        if isinstance(spec, float):
            raise ChainError(
                f"chain {spec!r} was read as a number (lm-eval turns 'chain=3.10' into 3.1); "
                "quote it in --model_args (chain='3.10') or write it as a JSON list"
            )
        if isinstance(spec, bool):
            raise ChainError(f"chain {spec!r} is not a chain; " + _SYNTAX_HELP)
        if isinstance(spec, int):
            return cls((spec,))
        if isinstance(spec, str):
            return cls(tuple(_parse_text(spec)))
        if isinstance(spec, Iterable):
            return cls(tuple(_as_index(item) for item in spec))
        raise ChainError(f"cannot read a chain from {type(spec).__name__}; " + _SYNTAX_HELP)

    def validate(self, n_layers: int, max_length: int | None = None) -> Chain:
        """Check the chain against a model of ``n_layers`` layers and the length cap."""
        self.check_range(n_layers)
        cap = max_length if max_length is not None else DEFAULT_MAX_LENGTH_FACTOR * n_layers
        if len(self) > cap:
            raise ChainError(
                f"chain '{self}' has {len(self)} layers, more than the cap of {cap}; "
                "shorten it or raise max_chain_length"
            )
        return self

    def check_range(self, n_layers: int) -> Chain:
        """Every index names a layer of a model ``n_layers`` deep."""
        for layer in self.layers:
            if layer >= n_layers:
                raise ChainError(
                    f"layer {layer} in chain '{self}' is out of range: "
                    f"the model has {n_layers} layers, numbered 0-{n_layers - 1}"
                )
        return self

    def is_identity(self, n_layers: int) -> bool:
        return self.layers == tuple(range(n_layers))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __str__(self) -> str:
        return ".".join(_format_run(run) for run in _ascending_runs(self.layers))

    def __repr__(self) -> str:
        return f"Chain('{self}')"


def _parse_text(text: str) -> list[int]:
    text = text.strip()
    if not text:
        raise ChainError("empty chain: a chain needs at least one layer; " + _SYNTAX_HELP)
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ChainError(f"chain '{text}' is not a valid JSON list ({err.msg})") from None
        if not isinstance(items, list):
            raise ChainError(f"chain '{text}' is not a JSON list; " + _SYNTAX_HELP)
        return [_as_index(item) for item in items]
    layers: list[int] = []
    for token in text.split("."):
        layers.extend(_parse_token(token, text))
    return layers


def _parse_token(token: str, text: str) -> list[int]:
    match = _TOKEN.match(token.strip())
    if match is None:
        shown = token if token else "(empty)"
        raise ChainError(f"bad token '{shown}' in chain '{text}': " + _SYNTAX_HELP)
    start = int(match["start"])
    end = int(match["end"]) if match["end"] is not None else start
    times = int(match["times"]) if match["times"] is not None else 1
    if times < 1:
        raise ChainError(f"bad token '{token}' in chain '{text}': a repeat count must be 1 or more")
    step = 1 if end >= start else -1
    return list(range(start, end + step, step)) * times


def _as_index(item: object) -> int:
    if isinstance(item, bool) or not isinstance(item, int):
        raise ChainError(f"layer {item!r} is not an integer; " + _SYNTAX_HELP)
    return item


def _ascending_runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _format_run(run: tuple[int, int]) -> str:
    start, end = run
    return str(start) if start == end else f"{start}-{end}"
