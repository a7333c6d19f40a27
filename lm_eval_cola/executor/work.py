"""What decoder layers compute, counted: the measure every speed claim is made in."""

from __future__ import annotations

from dataclasses import dataclass, fields


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
    #: calls of a decoder layer: each reads all the layer's weights, so on decoding steps (a
    #: token a row) they, not the tokens, are the cost
    layer_calls: int = 0
    #: token-layers of generation's decoding steps (after the prompt's prefill), counted apart
    #: because they run one token at a time
    decode_token_layers: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Work)))

    def __sub__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(Work)))
