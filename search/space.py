"""The search space of the CoLa paper: chains reached from the full model by block edits.

From a chain, an *action* either skips a block of ``k`` consecutive positions or repeats a
block of ``k`` positions ``r`` more times right after itself (``k, r <= 4`` by default). Every
chain of the space is reached from the identity by a sequence of actions and stays within the
length bounds. The paper's three variants restrict the actions: ``skip`` only, ``repeat`` only,
or ``both`` (the default).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

from lm_eval_cola.chain import Chain

Mode = Literal["both", "skip", "repeat"]
MODES: tuple[Mode, ...] = ("both", "skip", "repeat")


@dataclass(frozen=True)
class Action:
    """Skip ``size`` positions from ``start``, or repeat them ``times`` more times."""

    kind: Literal["skip", "repeat"]
    start: int
    size: int
    times: int = 1

    def apply(self, chain: Chain) -> Chain:
        layers = chain.layers
        end = self.start + self.size
        if self.kind == "skip":
            return Chain.derived(layers[: self.start] + layers[end:])
        return Chain.derived(layers[:end] + layers[self.start : end] * self.times + layers[end:])

    def length_after(self, length: int) -> int:
        """The length of a chain of ``length`` after this action."""
        return length - self.size if self.kind == "skip" else length + self.size * self.times

    def __str__(self) -> str:
        if self.kind == "skip":
            return f"skip {self.size} at {self.start}"
        return f"repeat {self.size} at {self.start} x{self.times}"


@dataclass(frozen=True)
class ChainSpace:
    """Which chains a search may visit for a model ``n_layers`` deep.

    Length bounds default to half the depth and one and a quarter times it: the public PoLar
    code bounds its searches similarly (e.g. 16-32 layers for a 28-layer model).
    """

    n_layers: int
    mode: Mode = "both"
    max_block: int = 4
    max_times: int = 4
    min_length: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown space '{self.mode}': choose one of {', '.join(MODES)}")
        if self.max_block < 1 or self.max_times < 1:
            raise ValueError("max_block and max_times must be at least 1")
        if not 1 <= self.lower <= self.n_layers <= self.upper:
            raise ValueError(
                f"length bounds {self.lower}-{self.upper} must include the model's depth "
                f"{self.n_layers} and be at least 1"
            )

    @property
    def lower(self) -> int:
        return self.min_length if self.min_length is not None else max(1, self.n_layers // 2)

    @property
    def upper(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return math.ceil(self.n_layers * 1.25)

    @property
    def root(self) -> Chain:
        return Chain.identity(self.n_layers)

    def actions(self, chain: Chain) -> tuple[Action, ...]:
        """Every action that keeps ``chain`` within the length bounds, in a fixed order."""
        return self._actions(len(chain))

    @functools.cache  # noqa: B019 (spaces are few, small and immutable)
    def _actions(self, length: int) -> tuple[Action, ...]:
        """The actions of a chain depend only on its length."""
        found = []
        for size in range(1, min(self.max_block, length) + 1):
            for start in range(length - size + 1):
                candidates = []
                if self.mode != "repeat":
                    candidates.append(Action("skip", start, size))
                if self.mode != "skip":
                    candidates += [
                        Action("repeat", start, size, t) for t in range(1, self.max_times + 1)
                    ]
                found += [
                    a for a in candidates if self.lower <= a.length_after(length) <= self.upper
                ]
        return tuple(found)

    def children(self, chain: Chain) -> dict[Chain, Action]:
        """Distinct chains one action away (different actions can give the same chain)."""
        out: dict[Chain, Action] = {}
        for action in self.actions(chain):
            out.setdefault(action.apply(chain), action)
        out.pop(chain, None)
        return out

    def describe(self) -> dict:
        """Everything that defines the space, with the bounds resolved (stored with a run)."""
        return {**asdict(self), "min_length": self.lower, "max_length": self.upper}


def single_reversions(chain: Chain, n_layers: int) -> list[Chain]:
    """The chains one edit closer to the full model: each skipped block put back, each
    repeated block taken out, one at a time (distinct, the chain itself left out).

    A chain reads as runs of consecutive ascending layers; between two runs the second either
    starts past the first's end (layers skipped) or at or before it (layers repeated). A run
    that starts after layer 0 or a last run that ends before the last layer skips the layers
    around it.
    """
    runs = _ascending_runs(chain.layers)
    found: dict[Chain, None] = {}
    starts = [-1, *(run[-1] for run in runs)]
    for index, run in enumerate(runs):
        before = starts[index]
        if run[0] > before + 1:  # a skip ahead of this run: put the layers back
            filled = list(range(before + 1, run[0]))
            found[_joined(runs[:index], [*filled, *run], runs[index + 1 :])] = None
        elif index and run[0] <= before:  # a repeat: this run starts within the layers done
            rest = [layer for layer in run if layer > before]
            found[_joined(runs[:index], rest, runs[index + 1 :])] = None
    if runs and runs[-1][-1] < n_layers - 1:
        tail = list(range(runs[-1][-1] + 1, n_layers))
        found[_joined(runs[:-1], [*runs[-1], *tail], [])] = None
    found.pop(chain, None)
    return [c for c in found if c.layers]


def _ascending_runs(layers: tuple[int, ...]) -> list[list[int]]:
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _joined(head: list[list[int]], middle: list[int], tail: list[list[int]]) -> Chain:
    layers = [layer for run in head for layer in run] + middle
    return Chain.derived(tuple(layers + [layer for run in tail for layer in run]))
