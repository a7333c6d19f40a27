"""An oracle beside its lottery: a gold search against the decoy search of the same settings.

A gold run and a decoy run (``cola search --target decoy``) pair up when they share model, task,
method, budget, seed, space and every other setting but the target. On the documents both have
finished, the question is how much more often a search reaches the gold answer than a wrong one
it was told to reach. A document counts for a target when the full model does not give that
target and some evaluated chain does. The fair comparison is on the documents where the full
model gives neither (both searches start from a wrong answer): there, *corrections above the
lottery* is the gold search's share minus the decoy's, with a paired 95% bootstrap interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lm_eval_cola.statistics import paired_interval
from lm_eval_cola.store.queries import per_document, run_depth
from lm_eval_cola.store.schema import Run


@dataclass(frozen=True)
class Reach:
    """Of the documents where the full model does not give a target, those a chain reaches."""

    documents: int
    reached: int

    @property
    def share(self) -> float | None:
        return self.reached / self.documents if self.documents else None


@dataclass(frozen=True)
class Lottery:
    """A gold run and its decoy run on the documents both finished."""

    gold_run: int
    decoy_run: int
    documents: int
    #: documents whose full model gives the gold answer, and the decoy
    gold_original: int
    decoy_original: int
    gold: Reach
    decoy: Reach
    #: on the documents where the full model gives neither answer
    neither: int
    gold_on_neither: int
    decoy_on_neither: int
    above_lottery: float | None
    interval: tuple[float, float] | None


def target_of(run: Run) -> str:
    return run.settings.get("target", "gold")


def paired_run(session: Session, run_id: int) -> int | None:
    """The run of the other target with every other setting the same, if there is one (the
    most recent, should there be several)."""
    run = session.get(Run, run_id)
    if run is None:
        raise ValueError(f"no run {run_id}")
    key = _settings_key(run)
    candidates = session.scalars(
        select(Run)
        .where(Run.model_id == run.model_id, Run.task_id == run.task_id, Run.id != run.id)
        .order_by(Run.id.desc())
    )
    for other in candidates:
        if target_of(other) != target_of(run) and _settings_key(other) == key:
            return other.id
    return None


def _settings_key(run: Run) -> tuple:
    settings = {k: v for k, v in run.settings.items() if k != "target"}
    return (run.method, run.budget, run.seed, run.space, settings)


def lottery(session: Session, gold_run: int, decoy_run: int) -> Lottery:
    """The gold run against the decoy run, document by document."""
    n_layers = run_depth(session, gold_run)
    gold = {row[0]: row for row in per_document(session, gold_run, n_layers)}
    decoy = {row[0]: row for row in per_document(session, decoy_run, n_layers)}
    common = [d for d in gold if d in decoy and gold[d][1] is not None and decoy[d][1] is not None]
    neither = [d for d in common if not gold[d][1] and not decoy[d][1]]
    gold_hits = [bool(gold[d][2]) for d in neither]
    decoy_hits = [bool(decoy[d][2]) for d in neither]
    difference = (sum(gold_hits) - sum(decoy_hits)) / len(neither) if neither else None
    return Lottery(
        gold_run=gold_run,
        decoy_run=decoy_run,
        documents=len(common),
        gold_original=sum(bool(gold[d][1]) for d in common),
        decoy_original=sum(bool(decoy[d][1]) for d in common),
        gold=_reach(gold, common),
        decoy=_reach(decoy, common),
        neither=len(neither),
        gold_on_neither=sum(gold_hits),
        decoy_on_neither=sum(decoy_hits),
        above_lottery=difference,
        interval=paired_interval(gold_hits, decoy_hits) if neither else None,
    )


def _reach(rows: dict[int, tuple], documents: list[int]) -> Reach:
    missed = [d for d in documents if not rows[d][1]]
    return Reach(len(missed), sum(bool(rows[d][2]) for d in missed))
