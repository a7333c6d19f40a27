"""The searcher interface: one small class per search method, all fed the same objective.

In the style of Optuna's ``BaseSampler``: a :class:`Searcher` proposes chains for one document
(:meth:`ask`) and is told how each scored (:meth:`tell`). :class:`DocumentSearch` owns the
budget and the memo, so every method is charged the same way: one unit per distinct chain
evaluated. A new method is one subclass registered with :func:`register_searcher`; nothing
else names it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

from lm_eval_cola.chain import Chain
from lm_eval_cola.registry import Registry
from lm_eval_cola.search.space import ChainSpace

if TYPE_CHECKING:  # the scorer loads torch and lm-eval: not needed to list or parse searches
    from lm_eval_cola.scoring import Trial

#: Proposals that repeat an already evaluated chain cost no budget, but a method that keeps
#: proposing known chains must still end: after this many proposals per unit of budget it
#: stops with fewer evaluations (the store records how many each document got).
MAX_PROPOSALS_PER_EVALUATION = 3
#: Chains of a document scored ahead of its pending one (:meth:`DocumentSearch.chains_ahead`,
#: ``cola search --look_ahead``): 20 took 0.85 of the time of 6 on GSM8K's long decodes, bound
#: by decoding calls; on ARC's letters a decoding step's rows run out first, and the work is
#: the same (docs/BENCHMARKS.md).
LOOK_AHEAD = 20


class Searcher(ABC):
    """Searches the chains of one document. Subclasses set ``name`` and register themselves."""

    name: ClassVar[str]
    #: whether :meth:`hypothetically` can undo asks and tells (a method whose state holds
    #: more than plain Python objects, such as an Optuna study, cannot)
    looks_ahead: ClassVar[bool] = False

    def __init__(self, space: ChainSpace, budget: int, seed: int) -> None:
        self.space, self.budget, self.seed = space, budget, seed

    @abstractmethod
    def ask(self) -> Chain:
        """The next chain to evaluate. The first one asked is the full model (the root)."""

    @abstractmethod
    def tell(self, trial: Trial) -> None:
        """The result of the chain last asked for."""

    @contextmanager
    def hypothetically(self) -> Iterator[None]:
        """Undo, on leaving, every ask and tell made inside: what the searcher would ask after
        a result it does not have yet, so that a search can evaluate that chain beside the
        pending one (:meth:`DocumentSearch.chains_ahead`). Here by restoring a copy of the state;
        a method with a large state undoes its changes instead (:class:`~.mcts.MCTS`)."""
        saved = copy.deepcopy({k: v for k, v in vars(self).items() if k != "space"})
        try:
            yield
        finally:
            vars(self).update(saved)

    def archive(self, storage: str, name: str) -> None:
        """Keep the method's own record of the finished document (an Optuna study) at
        ``storage`` under ``name``; methods that keep none have nothing to do."""

    @classmethod
    def prepare_archive(cls, storage: str) -> None:
        """Make ``storage`` ready for :meth:`archive` before the search starts, so that
        processes archiving into it at once (workers, shards) find it ready; methods that
        keep no record have nothing to do."""


_OPTUNA = "lm_eval_cola.search.optuna_searchers"
#: Every search method by name (``cola search --method``).
SEARCHERS: Registry[Searcher] = Registry(
    "method",
    {
        "mcts": "lm_eval_cola.search.mcts:MCTS",
        "tpe": f"{_OPTUNA}:TPE",
        "random": f"{_OPTUNA}:Random",
        "cmaes": f"{_OPTUNA}:CmaEs",
        "gp": f"{_OPTUNA}:GP",
        "qmc": f"{_OPTUNA}:QMC",
        "nsga2": f"{_OPTUNA}:NSGA2",
        "random-walk": "lm_eval_cola.search.baselines:RandomWalks",
        "menu": "lm_eval_cola.search.baselines:Menu",
    },
)


def register_searcher(cls: type[Searcher]) -> type[Searcher]:
    """Class decorator: make ``--method NAME`` (the class's ``name``) run this searcher."""
    return SEARCHERS.register(cls.name)(cls)


def searcher_class(name: str) -> type[Searcher]:
    return SEARCHERS.get(name)


class DocumentSearch:
    """One document's search: a searcher's proposals until its budget of distinct chains is
    spent. Proposals of chains already evaluated are answered from the memo at no cost; a
    method that keeps proposing them stops after ``MAX_PROPOSALS_PER_EVALUATION`` x budget
    proposals. Callers evaluate each chain :meth:`next_chain` returns and :meth:`record` it,
    so many documents' searches can share one forward pass."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.trials: dict[Chain, Trial] = {}
        self._proposals = 0
        self._pending: Chain | None = None

    def next_chain(self) -> Chain | None:
        """The next chain to evaluate, or ``None`` once the search is over."""
        budget = self.searcher.budget
        while len(self.trials) < budget and self._proposals < budget * MAX_PROPOSALS_PER_EVALUATION:
            chain = self.searcher.ask()
            self._proposals += 1
            if chain not in self.trials:
                self._pending = chain
                return chain
            self.searcher.tell(self.trials[chain])
        return None

    @property
    def pending(self) -> Chain | None:
        """The chain :meth:`next_chain` returned last, while its result is awaited."""
        return self._pending

    def chains_ahead(self, score: float, count: int) -> list[Chain]:
        """The next ``count`` chains :meth:`next_chain` will return if the pending chain and
        each of them score ``score`` (fewer where the search would end; none when the method
        cannot look ahead), asked inside :meth:`Searcher.hypothetically` so that the search
        is left exactly as it was. A search evaluates them beside the pending one on that
        guess (:meth:`~lm_eval_cola.search.runner.SearchRun._look_ahead`); where the guess
        fails, the method proposes what it would have proposed anyway."""
        from lm_eval_cola.scoring import Trial

        if self._pending is None or not self.searcher.looks_ahead:
            return []
        pending, proposals, chains = self._pending, self._proposals, []
        with self.searcher.hypothetically():
            while len(chains) < count:
                self.record(Trial(self._pending, score, score >= 1.0, {}))
                if (chain := self.next_chain()) is None:
                    break
                chains.append(chain)
        for chain in (pending, *chains):  # none was evaluated before: all were hypothetical
            self.trials.pop(chain, None)
        self._pending, self._proposals = pending, proposals
        return chains

    def record(self, trial: Trial) -> None:
        """The result of the chain :meth:`next_chain` returned last."""
        if trial.chain != self._pending:
            raise ValueError(f"trial of chain '{trial.chain}', expected '{self._pending}'")
        self.trials[trial.chain] = trial
        self._pending = None
        self.searcher.tell(trial)


def run_search(searcher: Searcher, objective: Callable[[Chain], Trial]) -> list[Trial]:
    """Evaluate what ``searcher`` asks for, one chain at a time, until its budget is spent."""
    search = DocumentSearch(searcher)
    while (chain := search.next_chain()) is not None:
        search.record(objective(chain))
    return list(search.trials.values())


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both score (higher) and length (shorter)."""
    front = []
    for trial in sorted(trials, key=lambda t: (-t.score, t.length, str(t.chain))):
        if not front or trial.length < front[-1].length:
            front.append(trial)
    return front
