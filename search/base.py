"""The searcher interface: one small class per search method, all fed the same objective.

In the style of Optuna's ``BaseSampler``: a :class:`Searcher` proposes chains for one document
(:meth:`ask`) and is told how each scored (:meth:`tell`). :func:`run_search` owns the budget and
the memo, so every method is charged the same way: one unit per distinct chain evaluated. A new
method is one subclass registered with :func:`register_searcher`; nothing else names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from lm_eval_cola.chain import Chain
from lm_eval_cola.search.space import ChainSpace

#: Proposals that repeat an already evaluated chain cost no budget, but a method that keeps
#: proposing known chains must still end: after this many proposals per unit of budget it
#: stops with fewer evaluations (the store records how many each document got).
MAX_PROPOSALS_PER_EVALUATION = 3


@dataclass(frozen=True)
class Trial:
    """A chain evaluated on the document: its score under the task's metric, and its cost."""

    chain: Chain
    score: float
    correct: bool
    metrics: dict[str, Any]
    layer_applications: int = 0
    seconds: float = 0.0

    @property
    def length(self) -> int:
        return len(self.chain)


class Searcher(ABC):
    """Searches the chains of one document. Subclasses set ``name`` and register themselves."""

    name: ClassVar[str]

    def __init__(
        self,
        space: ChainSpace,
        budget: int,
        seed: int,
        storage: str | None = None,
        study_name: str | None = None,
    ) -> None:
        """``storage`` and ``study_name`` say where a method that keeps its own records (an
        Optuna study) puts this document's; methods that keep none ignore them."""
        self.space, self.budget, self.seed = space, budget, seed
        self.storage, self.study_name = storage, study_name

    @abstractmethod
    def ask(self) -> Chain:
        """The next chain to evaluate. The first one asked is the full model (the root)."""

    @abstractmethod
    def tell(self, trial: Trial) -> None:
        """The result of the chain last asked for."""

    def close(self) -> None:
        """Release what the method holds (e.g. a study's storage) once the document is done."""


_OPTUNA = "lm_eval_cola.search.optuna_searchers"
#: Method name -> class, or "module:Class" for methods imported only when used.
SEARCHERS: dict[str, type[Searcher] | str] = {
    "mcts": "lm_eval_cola.search.mcts:MCTS",
    "tpe": f"{_OPTUNA}:TPE",
    "random": f"{_OPTUNA}:Random",
    "cmaes": f"{_OPTUNA}:CmaEs",
    "gp": f"{_OPTUNA}:GP",
    "qmc": f"{_OPTUNA}:QMC",
    "nsga2": f"{_OPTUNA}:NSGA2",
}


def register_searcher(cls: type[Searcher]) -> type[Searcher]:
    SEARCHERS[cls.name] = cls
    return cls


def searcher_class(name: str) -> type[Searcher]:
    import importlib

    if name not in SEARCHERS:
        raise ValueError(f"unknown method '{name}': choose one of {', '.join(sorted(SEARCHERS))}")
    found = SEARCHERS[name]
    if isinstance(found, str):
        module, _, attribute = found.partition(":")
        found = SEARCHERS[name] = getattr(importlib.import_module(module), attribute)
    return found


def run_search(searcher: Searcher, objective: Callable[[Chain], Trial]) -> list[Trial]:
    """Evaluate what ``searcher`` asks for until its budget of distinct chains is spent."""
    seen: dict[Chain, Trial] = {}
    for _ in range(searcher.budget * MAX_PROPOSALS_PER_EVALUATION):
        if len(seen) >= searcher.budget:
            break
        chain = searcher.ask()
        if chain not in seen:
            seen[chain] = objective(chain)
        searcher.tell(seen[chain])
    searcher.close()
    return list(seen.values())


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both score (higher) and length (shorter)."""
    front = []
    for trial in sorted(trials, key=lambda t: (-t.score, t.length, str(t.chain))):
        if not front or trial.length < front[-1].length:
            front.append(trial)
    return front
