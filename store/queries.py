"""The store's read side: the oracle pick and the paper's questions, computed in SQL.

Every function takes a SQLAlchemy session and returns plain rows; ``frames.py`` turns them
into pandas DataFrames. The pick ranks each document's evaluations with a window function, so
choosing one chain per document never loads the evaluations into Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Float, Integer, Text, case, cast, distinct, func, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from sqlalchemy.sql import Subquery

from lm_eval_cola.chain import Chain
from lm_eval_cola.store.schema import Base, Document, Evaluation, Model, Run, RunDocument, Task

if TYPE_CHECKING:  # the controls build on these queries
    from lm_eval_cola.store.controls import Controls

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
    ranked = _ranked(run_ids, policy)
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


def _ranked(run_ids: Sequence[int], policy: str) -> Subquery:
    """The evaluations of ``run_ids`` with ``rank``: 1 for each document's pick under ``policy``."""
    if policy not in PICKS:
        raise ValueError(f"unknown pick '{policy}': choose one of {', '.join(PICKS)}")
    order = {
        "best": (Evaluation.score.desc(), Evaluation.length, Evaluation.chain),
        "shortest-correct": (Evaluation.length, Evaluation.score.desc(), Evaluation.chain),
    }[policy]
    ranked = select(
        Evaluation.id,
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
    return ranked.subquery()


@dataclass(frozen=True)
class RunStats:
    """The CoLa paper's questions, for one run."""

    run_id: int
    documents: int
    original_accuracy: float | None
    oracle_accuracy: float | None
    shorter_correct_share: float | None
    corrected_share: float | None
    mean_chosen_length: float
    n_layers: int
    usage: list[float]
    skip_rate: list[float]
    repeat_rate: list[float]
    #: token positions x layers the search computed, and its physical limit (each distinct
    #: chain prefix once over each document's distinct tokens); None where not recorded
    token_layer_applications: int | None = None
    token_layer_limit: int | None = None
    #: documents by the number of distinct answers their evaluated chains gave ({2: 40}: 40
    #: documents got two different answers), and its mean; documents with no recorded
    #: answer (searched before schema 0003, or a task without answers) are left out
    answer_diversity: dict[int, int] = field(default_factory=dict)
    mean_distinct_answers: float | None = None
    #: the gold run this run is a control of (its decoy search, or an unguided control)
    control_of: int | None = None
    #: for a gold run, its stored controls (:mod:`lm_eval_cola.store.controls`), so that its
    #: oracle figures never stand alone; None while it has none
    controls: Controls | None = None


def per_document(session: Session, run_id: int, n_layers: int) -> list[Row]:
    """Per document of the run: ``document_id``; ``original``, the full model right (1/0, or
    ``None`` where it was not evaluated); ``any_correct``, some chain right; ``shorter_correct``,
    some chain shorter than the model right."""
    identity = str(Chain.identity(n_layers))
    correct = cast(Evaluation.correct, Integer)
    original = func.max(case((Evaluation.chain == identity, correct)))
    shorter = func.max(case((Evaluation.length < n_layers, correct), else_=0))
    query = (
        select(
            Evaluation.document_id,
            original.label("original"),
            func.max(correct).label("any_correct"),
            shorter.label("shorter_correct"),
        )
        .where(Evaluation.run_id == run_id)
        .group_by(Evaluation.document_id)
    )
    return list(session.execute(query))


def stats(session: Session, run_id: int) -> RunStats:
    n_layers = run_depth(session, run_id)
    docs = per_document(session, run_id, n_layers)
    with_original = [d for d in docs if d.original is not None]
    right = [d for d in with_original if d.original == 1]
    wrong = [d for d in with_original if d.original == 0]
    chosen = [Chain.parse(p.chain) for p in pick(session, [run_id])]
    return RunStats(
        run_id=run_id,
        documents=len(docs),
        original_accuracy=_share(len(right), len(with_original)),
        oracle_accuracy=_share(sum(d.any_correct for d in docs), len(docs)),
        shorter_correct_share=_share(sum(d.shorter_correct for d in right), len(right)),
        corrected_share=_share(sum(d.any_correct for d in wrong), len(wrong)),
        mean_chosen_length=sum(map(len, chosen)) / len(chosen) if chosen else 0.0,
        n_layers=n_layers,
        usage=[
            sum(chain.layers.count(layer) for chain in chosen) / max(len(chosen), 1)
            for layer in range(n_layers)
        ],
        skip_rate=_layer_rates(chosen, n_layers, lambda count: count == 0),
        repeat_rate=_layer_rates(chosen, n_layers, lambda count: count > 1),
        **_work(session, run_id),
        **_answers(session, run_id),
    )


def _answers(session: Session, run_id: int) -> dict[str, Any]:
    """How many different answers each document's chains gave (see :class:`RunStats`)."""
    distinct_answers = func.count(distinct(Evaluation.response))
    per_document = (
        select(distinct_answers.label("answers"))
        .where(Evaluation.run_id == run_id, Evaluation.response.is_not(None))
        .group_by(Evaluation.document_id)
        .subquery()
    )
    counted = select(per_document.c.answers, func.count()).group_by(per_document.c.answers)
    diversity = {int(n): int(documents) for n, documents in session.execute(counted)}
    documents = sum(diversity.values())
    mean = sum(n * d for n, d in diversity.items()) / documents if documents else None
    return {"answer_diversity": dict(sorted(diversity.items())), "mean_distinct_answers": mean}


def sampled_scheme():
    """Models registered under the earlier ``sampled`` fingerprint scheme (no scheme prefix:
    see ``fingerprint.py``)."""
    return Model.fingerprint.not_like("%:%")


def _work(session: Session, run_id: int) -> dict[str, int | None]:
    """The run's token-layer applications and their physical limit, each only when every
    document (or evaluation) recorded it: a partial sum would mislead."""
    evaluations = select(
        func.sum(Evaluation.token_layer_applications), func.count(Evaluation.id),
        func.count(Evaluation.token_layer_applications),
    ).where(Evaluation.run_id == run_id)  # fmt: skip
    limits = RunDocument.token_layer_limit
    documents = select(func.sum(limits), func.count(), func.count(limits)).where(
        RunDocument.run_id == run_id
    )
    computed, rows, known = session.execute(evaluations).one()
    limit, finished, limited = session.execute(documents).one()
    return {
        "token_layer_applications": computed if rows and known == rows else None,
        "token_layer_limit": limit if finished and limited == finished else None,
    }


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _layer_rates(chains: list[Chain], n_layers: int, test) -> list[float]:
    if not chains:
        return [0.0] * n_layers
    counts = [[chain.layers.count(layer) for layer in range(n_layers)] for chain in chains]
    return [sum(test(row[layer]) for row in counts) / len(chains) for layer in range(n_layers)]


# -- listings for frames.py and ``cola db`` ---------------------------------------------------

#: The store's tables, parents first.
TABLES = [table.name for table in Base.metadata.sorted_tables]


def find_run(session: Session, run: int | str) -> int | None:
    """The id of a run given by id or by name; digits are an id, as in ``chains=store:...``."""
    column, value = (Run.id, int(run)) if str(run).isdigit() else (Run.name, run)
    return session.scalar(select(Run.id).where(column == value))


@dataclass(frozen=True)
class RunSummary:
    """A run, its progress and its headline numbers."""

    id: int
    name: str | None
    method: str
    model: str
    n_layers: int
    task: str
    status: str
    budget: int
    seed: int
    n_documents: int
    done: int
    evaluations: int
    started_at: datetime
    #: When the run last finished a document: the store cannot tell a live search from a
    #: killed one (both leave the status "running"), but an old time here points to the latter.
    last_document_at: datetime | None
    finished_at: datetime | None
    original_accuracy: float | None
    oracle_accuracy: float | None


def run_summaries(session: Session) -> list[RunSummary]:
    """Every run with its progress and accuracies, aggregated in SQL per document then per run
    (the accuracies mean what :func:`stats` means by them)."""
    depths = list(session.scalars(select(Model.n_layers).distinct()))
    if not depths:
        return []
    per_run, done = _run_accuracies(depths), _documents_done()
    rows = session.execute(
        select(
            Run.id,
            Run.name,
            Run.method,
            Model.name.label("model"),
            Model.n_layers,
            Task.name.label("task"),
            Run.status,
            Run.budget,
            Run.seed,
            Run.n_documents,
            func.coalesce(done.c.done, 0).label("done"),
            func.coalesce(per_run.c.evaluations, 0).label("evaluations"),
            Run.started_at,
            done.c.last.label("last_document_at"),
            Run.finished_at,
            per_run.c.original.label("original_accuracy"),
            per_run.c.oracle.label("oracle_accuracy"),
        )
        .join(Model, Model.id == Run.model_id)
        .join(Task, Task.id == Run.task_id)
        .outerjoin(done, done.c.run_id == Run.id)
        .outerjoin(per_run, per_run.c.run_id == Run.id)
        .order_by(Run.id)
    )
    return [RunSummary(**row._mapping) for row in rows]


def _run_accuracies(depths: list[int]) -> Subquery:
    """Per run: evaluations, and the share of documents the full model (the identity chain of
    its depth) and any chain got right."""
    identity = case({n: str(Chain.identity(n)) for n in depths}, value=Model.n_layers)
    correct = cast(Evaluation.correct, Integer)
    per_document = (
        select(
            Evaluation.run_id,
            func.count().label("evaluations"),
            func.max(case((Evaluation.chain == identity, correct))).label("original"),
            func.max(correct).label("oracle"),
        )
        .join(Run, Run.id == Evaluation.run_id)
        .join(Model, Model.id == Run.model_id)
        .group_by(Evaluation.run_id, Evaluation.document_id)
        .subquery()
    )
    return (
        select(
            per_document.c.run_id,
            cast(func.sum(per_document.c.evaluations), Integer).label("evaluations"),
            cast(func.avg(per_document.c.original), Float).label("original"),
            cast(func.avg(per_document.c.oracle), Float).label("oracle"),
        )
        .group_by(per_document.c.run_id)
        .subquery()
    )


def _documents_done() -> Subquery:
    """Per run: documents finished, and when the last one was."""
    return (
        select(
            RunDocument.run_id,
            func.count().label("done"),
            func.max(RunDocument.finished_at).label("last"),
        )
        .group_by(RunDocument.run_id)
        .subquery()
    )


@dataclass(frozen=True)
class EvaluationRow:
    """An evaluation with the document it was made on."""

    run_id: int
    task: str
    doc_id: int
    doc_hash: str
    chain: str
    length: int
    score: float
    correct: bool
    response: str | None
    metrics: dict[str, Any]


def evaluations(
    session: Session, run_ids: Sequence[int], policy: str | None = None
) -> list[EvaluationRow]:
    """Every evaluation of ``run_ids``, or with a ``policy`` only each document's pick (as
    :func:`pick` chooses it, here with its metrics); a document's best evaluation first."""
    query = (
        select(
            Evaluation.run_id,
            Task.name,
            Document.doc_id,
            Document.doc_hash,
            Evaluation.chain,
            Evaluation.length,
            Evaluation.score,
            Evaluation.correct,
            Evaluation.response,
            Evaluation.metrics,
        )
        .join(Document, Document.id == Evaluation.document_id)
        .join(Task, Task.id == Document.task_id)
    )
    if policy is None:
        query = query.where(Evaluation.run_id.in_(run_ids))
    else:
        ranked = _ranked(run_ids, policy)
        query = query.join(ranked, ranked.c.id == Evaluation.id).where(ranked.c.rank == 1)
    order = (Evaluation.run_id, Evaluation.score.desc(), Evaluation.length, Evaluation.chain)
    rows = session.execute(query.order_by(Task.name, Document.doc_id, *order))
    return [EvaluationRow(*row) for row in rows]


def table(session: Session, name: str) -> tuple[list[str], list[tuple]]:
    """A whole table as (column names, rows), JSON columns as their stored text, so that an
    export holds exactly what the store holds and reads back as it was written."""
    if name not in TABLES:
        raise ValueError(f"no table '{name}': the store's tables are {', '.join(TABLES)}")
    columns = Base.metadata.tables[name].c
    as_text = [cast(c, Text).label(c.name) if isinstance(c.type, JSON) else c for c in columns]
    rows = session.execute(select(*as_text).order_by(*Base.metadata.tables[name].primary_key))
    return list(columns.keys()), [tuple(row) for row in rows]


# -- training data for predictors ---------------------------------------------------------------


def frequent_chains(session: Session, run_ids: Sequence[int], limit: int) -> list[str]:
    """The ``limit`` chains that are correct on the most documents of the runs (shortest first
    among equals): the candidates a predictor chooses from."""
    documents = func.count(func.distinct(Evaluation.document_id))
    rows = session.execute(
        select(Evaluation.chain)
        .where(Evaluation.run_id.in_(run_ids), Evaluation.correct)
        .group_by(Evaluation.chain, Evaluation.length)
        .order_by(documents.desc(), Evaluation.length, Evaluation.chain)
        .limit(limit)
    )
    return list(rows.scalars())


def chain_scores(
    session: Session, run_ids: Sequence[int], chains: Sequence[str]
) -> list[tuple[str, str, float, bool]]:
    """(doc_hash, chain, score, correct) of every stored evaluation of ``chains`` in the runs."""
    rows = session.execute(
        select(Document.doc_hash, Evaluation.chain, Evaluation.score, Evaluation.correct)
        .join(Document, Document.id == Evaluation.document_id)
        .where(Evaluation.run_id.in_(run_ids), Evaluation.chain.in_(list(chains)))
    )
    return [tuple(row) for row in rows]


def correct_chains(session: Session, run_ids: Sequence[int]) -> dict[str, list[str]]:
    """Per document hash, every distinct chain the runs found correct on it."""
    rows = session.execute(
        select(Document.doc_hash, Evaluation.chain)
        .join(Document, Document.id == Evaluation.document_id)
        .where(Evaluation.run_id.in_(run_ids), Evaluation.correct.is_(True))
        .distinct()
    )
    found: dict[str, list[str]] = {}
    for doc_hash, chain in rows:
        found.setdefault(doc_hash, []).append(chain)
    return found


def finished_documents(session: Session, run_ids: Sequence[int]) -> list[str]:
    """The content hashes of the documents the runs have finished, in ``doc_id`` order."""
    rows = session.execute(
        select(Document.doc_hash)
        .join(RunDocument, RunDocument.document_id == Document.id)
        .where(RunDocument.run_id.in_(run_ids))
        .group_by(Document.doc_hash, Document.doc_id)
        .order_by(Document.doc_id)
    )
    return list(rows.scalars())


# -- the figures' data --------------------------------------------------------------------------


def _original_correct(run_id: int, n_layers: int) -> Subquery:
    """Per document of the run: whether its identity chain (the full model) was correct."""
    identity = str(Chain.identity(n_layers))
    return (
        select(
            Evaluation.document_id,
            func.max(cast(Evaluation.correct, Integer)).label("original"),
        )
        .where(Evaluation.run_id == run_id, Evaluation.chain == identity)
        .group_by(Evaluation.document_id)
        .subquery()
    )


def chosen_lengths(session: Session, run_id: int) -> list[tuple[int | None, bool, int]]:
    """Per document: (original correct 1/0 or None, best chain correct, best chain's length),
    the best chain as :func:`pick` chooses it with ``best``."""
    n_layers = run_depth(session, run_id)
    ranked, original = _ranked([run_id], "best"), _original_correct(run_id, n_layers)
    rows = session.execute(
        select(original.c.original, ranked.c.correct, ranked.c.length)
        .select_from(ranked)
        .outerjoin(original, original.c.document_id == ranked.c.document_id)
        .where(ranked.c.rank == 1)
    )
    return [(row[0], bool(row[1]), row[2]) for row in rows]


def shortest_correct(session: Session, run_id: int) -> list[int | None]:
    """Per document, the length of its shortest correct chain (None: no chain is correct)."""
    shortest = func.min(case((Evaluation.correct, Evaluation.length)))
    rows = session.execute(
        select(shortest).where(Evaluation.run_id == run_id).group_by(Evaluation.document_id)
    )
    return list(rows.scalars())


def common_documents(session: Session, run_ids: Sequence[int]) -> list[int]:
    """The documents (store ids) that every one of the runs has finished: the set on which
    methods are compared, since runs of different methods may have got to different counts."""
    wanted = set(run_ids)
    rows = session.execute(
        select(RunDocument.document_id)
        .where(RunDocument.run_id.in_(wanted))
        .group_by(RunDocument.document_id)
        .having(func.count(RunDocument.run_id.distinct()) == len(wanted))
        .order_by(RunDocument.document_id)
    )
    return list(rows.scalars())


def _in_order(run_id: int, documents: Sequence[int] | None) -> Subquery:
    """The run's evaluations of ``documents`` (all when None), numbered per document in the
    order the search made them: a document's evaluations are written in one insert, in that
    order, so their ids follow it."""
    step = func.row_number().over(partition_by=Evaluation.document_id, order_by=Evaluation.id)
    query = select(
        Evaluation.document_id,
        Evaluation.chain,
        Evaluation.score,
        Evaluation.length,
        Evaluation.correct,
        step.label("step"),
    ).where(Evaluation.run_id == run_id)
    if documents is not None:
        query = query.where(Evaluation.document_id.in_(documents))
    return query.subquery()


def first_correct_step(
    session: Session, run_id: int, documents: Sequence[int] | None = None, shorter: bool = False
) -> list[int | None]:
    """Per document (of ``documents``, or all the run has, by document id), how many
    evaluations the search needed before its first correct chain (1: the full model was
    correct; None: none was). ``shorter``: only chains shorter than the model count, the
    paper's other claim (a document the model gets right keeps a right chain with fewer
    layers)."""
    ordered = _in_order(run_id, documents)
    right = ordered.c.correct
    if shorter:
        right = right & (ordered.c.length < run_depth(session, run_id))
    rows = session.execute(
        select(func.min(case((right, ordered.c.step))))
        .group_by(ordered.c.document_id)
        .order_by(ordered.c.document_id)
    )
    return list(rows.scalars())


def document_evaluations(session: Session, run_id: int, doc_id: int) -> list[tuple[int, float]]:
    """(length, score) of every chain the run evaluated on the document with this ``doc_id``."""
    rows = session.execute(
        select(Evaluation.length, Evaluation.score)
        .join(Document, Document.id == Evaluation.document_id)
        .where(Evaluation.run_id == run_id, Document.doc_id == doc_id)
    )
    return [tuple(row) for row in rows]


def run_depth(session: Session, run_id: int) -> int:
    n_layers = session.scalar(select(Model.n_layers).join(Run).where(Run.id == run_id))
    if n_layers is None:
        raise ValueError(f"no run {run_id} in the store")
    return n_layers


def best_within_budget(
    session: Session, run_id: int, budget: int, documents: Sequence[int] | None = None
) -> list[tuple[bool, int]]:
    """Per document (of ``documents``, or all the run has), (correct, length) of the best chain
    (highest score, then shortest) among the first ``budget`` evaluations the search made:
    what a run with that budget would have found, for methods that do not plan with their
    total budget (none of ours does)."""
    ordered = _in_order(run_id, documents)
    order = (ordered.c.score.desc(), ordered.c.length, ordered.c.chain)
    rank = func.row_number().over(partition_by=ordered.c.document_id, order_by=order)
    ranked = (
        select(ordered.c.correct, ordered.c.length, rank.label("rank"))
        .where(ordered.c.step <= budget)
        .subquery()
    )
    rows = session.execute(select(ranked.c.correct, ranked.c.length).where(ranked.c.rank == 1))
    return [(bool(correct), length) for correct, length in rows]


def run_seconds(session: Session, run_id: int) -> float:
    """Wall time the run spent on its finished documents, over all its processes and restarts."""
    total = session.scalar(
        select(func.sum(RunDocument.seconds)).where(RunDocument.run_id == run_id)
    )
    return float(total or 0.0)
