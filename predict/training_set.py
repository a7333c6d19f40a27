"""What predictors train on: documents x candidate chains, as a value.

Kept apart from :mod:`~lm_eval_cola.predict.dataset`, which builds it from a store with the
objective, so that loading a trained predictor (``chains=predictor:``) needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lm_eval_cola.chain import Chain
from lm_eval_cola.errors import ColaError
from lm_eval_cola.executor import MAX_ROUTED_RUNS
from lm_eval_cola.predict.features import FeatureSpec


class TrainingDataError(ColaError, ValueError):
    """The runs cannot train a predictor for this model; the message says why."""


@dataclass(frozen=True)
class RoutePath:
    """A document's target path for routers: how many times each layer runs (0, 1 or 2),
    and the windowed mean-pooled hidden state entering each layer along that path. Where
    several right chains are equally short, ``ties`` says per layer, of those that agree with
    the path on every earlier layer, the share that runs it 0, 1 or 2 times: each such
    decision keeps a router on a shortest right chain, so none is the one right answer."""

    runs: torch.Tensor  # (layers,) long
    states: torch.Tensor  # (layers, hidden) float32
    ties: torch.Tensor | None = None  # (layers, 3) float32, rows sum to 1; None: one-hot runs

    def targets(self, tied: bool = True) -> torch.Tensor:
        """(layers, 3): the share of shortest right chains taking each decision (``tied``), or
        one-hot along the followed path."""
        if tied and self.ties is not None:
            return self.ties
        return torch.nn.functional.one_hot(self.runs, MAX_ROUTED_RUNS + 1).float()


@dataclass
class TrainingSet:
    """Training documents × candidate chains, with the documents' prompt states, and for
    routers each document's target path (``None`` where no right chain is routable). States
    and paths are built only for the kinds that read them: ``None`` otherwise."""

    task: str
    split: str | None
    metric: str | None
    doc_hashes: list[str]
    candidates: list[Chain]
    scores: torch.Tensor  # (documents, candidates), the task metric, higher is better
    correct: torch.Tensor  # (documents, candidates), bool
    states: list[torch.Tensor] | None  # per document, (tokens, hidden size); None: not built
    spec: FeatureSpec
    filled: int  # evaluations run here because the store did not hold them
    routes: list[RoutePath | None] | None = None  # None: not built (no router among the kinds)

    def within(self, max_layers: int) -> TrainingSet:
        """The same documents with only the candidates of at most ``max_layers`` layers (a
        depth budget)."""
        keep = [j for j, chain in enumerate(self.candidates) if len(chain) <= max_layers]
        if not keep:
            shortest = min(map(len, self.candidates))
            raise TrainingDataError(
                f"no candidate chain has at most {max_layers} layers (the shortest has "
                f"{shortest}); add shorter ones with --prune_to {max_layers}"
            )
        return replace(
            self,
            candidates=[self.candidates[j] for j in keep],
            scores=self.scores[:, keep],
            correct=self.correct[:, keep],
        )
