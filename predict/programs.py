"""PoLar's programs of layers: a chain as per-layer operations a network can predict.

The model's layers are cut into contiguous segments of at most ``MAX_SEGMENT`` layers; each
segment is skipped, kept, or repeated once (run twice in a row). So a program never reorders
layers, and the chain it stands for is at most twice the model's depth. As labels a network
can learn, a program is a boundary mask (True where a segment starts) and, at each segment
start, the index of its operation in ``OPERATIONS``; layers inside a segment carry the
segment's operation too, which the loss ignores.

Chains found by search that are not programs (a block repeated more than once, or a repeat
that spans a skipped layer) have no parse; a predictor of programs learns from the others.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lm_eval_cola.chain import Chain

MAX_SEGMENT = 4
OPERATIONS = ("skip", "keep", "repeat")
SKIP, KEEP, REPEAT = range(len(OPERATIONS))


@dataclass(frozen=True)
class Program:
    """Per-layer labels: ``starts[i]`` is True where a segment begins; ``operations[i]`` is
    the operation of the segment that holds layer ``i``."""

    starts: tuple[bool, ...]
    operations: tuple[int, ...]

    def chain(self) -> Chain | None:
        """The chain the program runs; None when it skips every layer."""
        layers: list[int] = []
        for begin, end, operation in self.segments():
            block = list(range(begin, end))
            layers += {SKIP: [], KEEP: block, REPEAT: block + block}[operation]
        return Chain.parse(layers) if layers else None

    def segments(self) -> list[tuple[int, int, int]]:
        """(first layer, end, operation) of each segment."""
        begins = [i for i, start in enumerate(self.starts) if start]
        ends = [*begins[1:], len(self.starts)]
        return [(b, e, self.operations[b]) for b, e in zip(begins, ends, strict=True)]

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.starts, dtype=torch.float32), torch.tensor(self.operations)


def parse(chain: Chain, n_layers: int) -> Program | None:
    """The program that runs ``chain`` with the fewest segments, or None if none does."""
    layers = tuple(chain)

    @functools.cache
    def best(position: int, layer: int) -> tuple[tuple[int, int, int], ...] | None:
        """Fewest (first layer, size, operation) segments covering ``layers[position:]`` from
        model layer ``layer`` on; ties go to longer segments, then skip < keep < repeat."""
        if layer == n_layers:
            return () if position == len(layers) else None
        found = None
        for size in range(min(MAX_SEGMENT, n_layers - layer), 0, -1):
            block = tuple(range(layer, layer + size))
            for operation, used in ((SKIP, ()), (KEEP, block), (REPEAT, block + block)):
                if layers[position : position + len(used)] != used:
                    continue
                rest = best(position + len(used), layer + size)
                if rest is not None and (found is None or len(rest) + 1 < len(found)):
                    found = ((layer, size, operation), *rest)
        return found

    segments = best(0, 0)
    if segments is None:
        return None
    starts, operations = [False] * n_layers, [KEEP] * n_layers
    for first, size, operation in segments:
        starts[first] = True
        operations[first : first + size] = [operation] * size
    return Program(tuple(starts), tuple(operations))


def decode(start_logits: torch.Tensor, operation_logits: torch.Tensor) -> Program:
    """PoLar's greedy decoding: a segment starts where sigmoid(start logit) > 0.5 (and at
    least every ``MAX_SEGMENT`` layers), and runs the operation its first layer scores best."""
    starts, operations, length = [], [], 0
    for i, logit in enumerate(start_logits.tolist()):
        start = i == 0 or logit > 0 or length == MAX_SEGMENT
        length = 1 if start else length + 1
        starts.append(start)
        operations.append(int(operation_logits[i].argmax()) if start else operations[-1])
    return Program(tuple(starts), tuple(operations))


def longest(n_layers: int) -> Chain:
    """The longest chain any program runs: every layer repeated once, block by block."""
    return Program(
        tuple(i % MAX_SEGMENT == 0 for i in range(n_layers)), (REPEAT,) * n_layers
    ).chain()
