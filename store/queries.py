"""The store's read side: the oracle pick and the paper's questions, computed in SQL.

Every function takes a SQLAlchemy session and returns plain rows; ``frames.py`` turns them
into pandas DataFrames. The pick ranks each document's evaluations with a window function, so
choosing one chain per document never loads the evaluations into Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lm_eval_cola.store.schema import Document, Evaluation, Model, Run, Task
from sqlalchemy import Integer, case, cast, func, select
from sqlalchemy.orm import Session

from lm_eval_cola.chain import Chain

#: How to choose one chain per document. Each is an ORDER BY over the document's evaluations
#: and a filter; ties end on the chain text, so a pick is deterministic.
PICKS = {
    "best": "highest score, then the shortest chain",
    "shortest-correct": "the shortest correct chain, then the highest score",
}


@dataclass(frozen=True)
class Pick:
    task: str
    doc_hash: str
    doc_id: int
    chain: str
    length: int
    score: float
    correct: bool
    run_id: int


def pick(session: Session, run_ids: Sequence[int], policy: str = "best") -> list[Pick]:
    """One chain per document over the evaluations of ``run_ids``, chosen by ``policy``."""
    if policy not in PICKS:
        raise ValueError(f"unknown pick '{policy}': choose one of {', '.join(PICKS)}")
    order = {
        "best": (Evaluation.score.desc(), Evaluation.length, Evaluation.chain),
        "shortest-correct": (Evaluation.length, Evaluation.score.desc(), Evaluation.chain),
    }[policy]
    ranked = select(
        Evaluation.document_id,
        Evaluation.run_id,
        Evaluation.chain,
        Evaluation.length,
        Evaluation.score,
        Evaluation.correct,
        func.row_number().over(partition_by=Evaluation.document_id, order_by=order).label("rank"),
    ).where(Evaluation.run_id.in_(run_ids))
    if policy == "shortest-correct":
        ranked = ranked.where(Evaluation.correct)
    ranked = ranked.subquery()
    rows = session.execute(
        select(
            Task.name,
            Document.doc_hash,
            Document.doc_id,
            ranked.c.chain,
            ranked.c.length,
            ranked.c.score,
            ranked.c.correct,
            ranked.c.run_id,
        )
        .join(Document, Document.id == ranked.c.document_id)
        .join(Task, Task.id == Document.task_id)
        .where(ranked.c.rank == 1)
        .order_by(Task.name, Document.doc_id)
    )
    return [Pick(*row) for row in rows]


@dataclass(frozen=True)
class RunStats:
    """The CoLa paper's questions, for one run."""

    run_id: int
    documents: int
    original_accuracy: float | None
    oracle_accuracy: float
    shorter_correct_share: float | None
    corrected_share: float | None
    mean_chosen_length: float
    n_layers: int
    skip_rate: list[float]
    repeat_rate: list[float]


def per_document(session: Session, run_id: int, n_layers: int) -> list[tuple]:
    """(document_id, original correct or None, any chain correct, a shorter chain correct)."""
    identity = str(Chain.identity(n_layers))
    correct = cast(Evaluation.correct, Integer)
    original = func.max(case((Evaluation.chain == identity, correct)))
    shorter = func.max(case((Evaluation.length < n_layers, correct), else_=0))
    query = (
        select(Evaluation.document_id, original, func.max(correct), shorter)
        .where(Evaluation.run_id == run_id)
        .group_by(Evaluation.document_id)
    )
    return list(session.execute(query))


def stats(session: Session, run_id: int) -> RunStats:
    n_layers = session.scalar(select(Model.n_layers).join(Run).where(Run.id == run_id))
    if n_layers is None:
        raise ValueError(f"no run {run_id} in the store")
    docs = per_document(session, run_id, n_layers)
    with_original = [d for d in docs if d[1] is not None]
    right = [d for d in with_original if d[1] == 1]
    wrong = [d for d in with_original if d[1] == 0]
    chosen = [Chain.parse(p.chain) for p in pick(session, [run_id])]
    return RunStats(
        run_id=run_id,
        documents=len(docs),
        original_accuracy=_share(len(right), len(with_original)),
        oracle_accuracy=_share(sum(d[2] for d in docs), len(docs)) or 0.0,
        shorter_correct_share=_share(sum(d[3] for d in right), len(right)),
        corrected_share=_share(sum(d[2] for d in wrong), len(wrong)),
        mean_chosen_length=sum(map(len, chosen)) / len(chosen) if chosen else 0.0,
        n_layers=n_layers,
        skip_rate=_layer_rates(chosen, n_layers, lambda count: count == 0),
        repeat_rate=_layer_rates(chosen, n_layers, lambda count: count > 1),
    )


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _layer_rates(chains: list[Chain], n_layers: int, test) -> list[float]:
    if not chains:
        return [0.0] * n_layers
    counts = [[chain.layers.count(layer) for layer in range(n_layers)] for chain in chains]
    return [sum(test(row[layer]) for row in counts) / len(chains) for layer in range(n_layers)]
