"""Optuna's samplers as baselines, on the same chain space, objective and budget as MCTS.

A chain is encoded as ``max_edits`` edit slots of integers, each ``(op, start, size, times)``:
``op`` is none, skip or repeat (only the kinds the space's mode allows), and slots are applied in
order to the full model, exactly like a path of MCTS actions; an edit that would leave the
space's length bounds is ignored. Integers suit every sampler, CMA-ES included. The first trial
is enqueued as the full model, so every method starts from the root.

Single-objective samplers maximise ``score - length_weight * length / depth`` (a small weight:
a correct chain always beats a wrong one, and of two equal scores the shorter wins); NSGA-II
optimises (score, length) as two objectives. A study runs in memory and is archived, once the
document is done, to an Optuna storage URL (the store's, so ``optuna-dashboard`` shows it).
"""

from __future__ import annotations

from typing import ClassVar

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from lm_eval_cola.chain import Chain
from lm_eval_cola.scoring import Trial
from lm_eval_cola.search.base import Searcher, register_searcher
from lm_eval_cola.search.space import Action, ChainSpace
from lm_eval_cola.store.engine import BUSY_TIMEOUT_S

OPS = {"both": (None, "skip", "repeat"), "skip": (None, "skip"), "repeat": (None, "repeat")}


class OptunaSearcher(Searcher):
    """A searcher backed by one Optuna study per document."""

    sampler_class: ClassVar[type[optuna.samplers.BaseSampler]]
    directions: ClassVar[list[str]] = ["maximize"]

    def __init__(
        self,
        space: ChainSpace,
        budget: int,
        seed: int,
        max_edits: int = 8,
        length_weight: float = 0.1,
    ) -> None:
        super().__init__(space, budget, seed)
        self.max_edits, self.length_weight = max_edits, length_weight
        self.ops = OPS[space.mode]
        self.study = optuna.create_study(
            study_name=self.name,
            storage=optuna.storages.InMemoryStorage(),
            sampler=self.make_sampler(seed),
            directions=self.directions,
        )
        self.study.enqueue_trial(dict.fromkeys(self._op_names(), 0))
        self._trial: optuna.Trial | None = None

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return self.sampler_class(seed=seed)

    def _op_names(self) -> list[str]:
        return [f"edit{i}_op" for i in range(self.max_edits)]

    def ask(self) -> Chain:
        self._trial = self.study.ask()
        return self.decode(self._trial)

    def decode(self, trial: optuna.Trial) -> Chain:
        """Apply the trial's edit slots in order to the full model."""
        chain = self.space.root
        upper = self.space.upper
        for i in range(self.max_edits):
            op = self.ops[trial.suggest_int(f"edit{i}_op", 0, len(self.ops) - 1)]
            start = trial.suggest_int(f"edit{i}_start", 0, upper - 1)
            size = trial.suggest_int(f"edit{i}_size", 1, self.space.max_block)
            times = trial.suggest_int(f"edit{i}_times", 1, self.space.max_times)
            if op is None or size > len(chain):
                continue
            action = Action(op, min(start, len(chain) - size), size, times)
            if self.space.lower <= action.length_after(len(chain)) <= upper:
                chain = action.apply(chain)
        return chain

    def tell(self, trial: Trial) -> None:
        self.study.tell(self._trial, self.values(trial))

    def values(self, trial: Trial) -> float | list[float]:
        return trial.score - self.length_weight * trial.length / self.space.n_layers

    @classmethod
    def prepare_archive(cls, storage: str) -> None:
        """Create Optuna's tables in ``storage`` now: two processes creating them at once
        collide on Optuna's version row, so the one that loses looks again and finds them."""
        for attempt in range(2):
            try:
                _rdb_storage(storage).engine.dispose()
                return
            except DBAPIError:
                if attempt:
                    raise

    def archive(self, storage: str, name: str) -> None:
        """Copy the finished study to ``storage`` as ``name``, in one go: a study in an RDB
        storage costs a transaction per parameter while it runs (tens of seconds a document
        on SQLite)."""
        archive = _rdb_storage(storage)
        try:
            if name in optuna.get_all_study_names(storage=archive):
                optuna.delete_study(study_name=name, storage=archive)  # from a killed attempt
            optuna.copy_study(
                from_study_name=self.study.study_name,
                from_storage=self.study._storage,
                to_storage=archive,
                to_study_name=name,
            )
        finally:
            archive.engine.dispose()


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, waiting for the store's other writers as the store does:
    Optuna's own SQLite engine gives up after 5 s, which a worker archiving while the searching
    process writes a document can reach on a busy machine."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}} if sqlite else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


@register_searcher
class TPE(OptunaSearcher):
    name = "tpe"
    sampler_class = optuna.samplers.TPESampler


@register_searcher
class Random(OptunaSearcher):
    name = "random"
    sampler_class = optuna.samplers.RandomSampler


@register_searcher
class CmaEs(OptunaSearcher):
    name = "cmaes"
    sampler_class = optuna.samplers.CmaEsSampler


@register_searcher
class GP(OptunaSearcher):
    name = "gp"
    sampler_class = optuna.samplers.GPSampler


@register_searcher
class QMC(OptunaSearcher):
    name = "qmc"
    sampler_class = optuna.samplers.QMCSampler


@register_searcher
class NSGA2(OptunaSearcher):
    """Two objectives, score up and length down: the accuracy-depth Pareto front.

    Its first generation (``population_size``, Optuna's default 50) is random sampling, so
    below that budget NSGA-II is random search; give a smaller population to see it evolve
    within a small budget (``--method_args population_size=10``).
    """

    name = "nsga2"
    sampler_class = optuna.samplers.NSGAIISampler
    directions: ClassVar[list[str]] = ["maximize", "minimize"]

    def __init__(self, *args, population_size: int = 50, **kwargs) -> None:
        self.population_size = population_size  # make_sampler, called by super, reads it
        super().__init__(*args, **kwargs)

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return self.sampler_class(seed=seed, population_size=self.population_size)

    def values(self, trial: Trial) -> list[float]:
        return [trial.score, float(trial.length)]
