"""The chain store's schema: every chain evaluated for every sample, and where it came from.

Reading order: a :class:`Model` (weights, identified by fingerprint) is evaluated on a
:class:`Task`'s :class:`Document` s by a search :class:`Run`; each chain tried on a document is
one :class:`Evaluation`, and :class:`RunDocument` marks a document of a run as done. A document's
evaluations and its done mark are written in one transaction, so a killed writer leaves either
all of them or none.

Changing this file needs a migration in ``store/migrations/versions`` (a test compares them).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import JSON, Float, ForeignKey, Index, MetaData, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Run status values.
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
#: Characters of an answer the store keeps (the search cuts generated answers shorter).
RESPONSE_LENGTH = 256


def decoded_batch_invariantly(settings: dict[str, Any]) -> bool:
    """Whether a run with these :attr:`Run.settings` decoded its generations batch-invariantly
    (runs from before that mode record HF's ``generate`` or nothing)."""
    return settings.get("decoding") == "batch_invariant"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


#: Deterministic constraint names, so migrations can name what they change on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # Float, not SQLAlchemy 2.1's default Double, so migration 0001 matches on 2.0 and 2.1.
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON, float: Float}


class Model(Base):
    """The weights chains were evaluated on; a chain is only valid for its own model."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(512), doc="pretrained as given: hub id or path")
    revision: Mapped[str | None] = mapped_column(String(128))
    architecture: Mapped[str] = mapped_column(String(64), doc="config.model_type, e.g. llama")
    n_layers: Mapped[int] = mapped_column(doc="decoder layers of the unmodified model")
    dtype: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True, doc="fingerprint.py")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """An lm-eval task, pinned by a hash of its full config (prompt, split, metrics...)."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("name", "config_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    split: Mapped[str | None] = mapped_column(String(64), doc="the split documents come from")
    output_type: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Document(Base):
    """One sample of a task, identified by the hash of its content (lm-eval's ``doc_hash``)."""

    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("task_id", "doc_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    doc_hash: Mapped[str] = mapped_column(String(64))
    doc_id: Mapped[int] = mapped_column(doc="position in the task's evaluation split")
    fields: Mapped[dict[str, Any]] = mapped_column(doc="the document, to show it")

    task: Mapped[Task] = relationship()


class Run(Base):
    """One search over a task's documents with one method, space, budget and seed."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    method: Mapped[str] = mapped_column(String(64), doc="searcher name, e.g. mcts or tpe")
    space: Mapped[dict[str, Any]] = mapped_column(doc="the search space and its bounds")
    budget: Mapped[int] = mapped_column(doc="chain evaluations per document")
    seed: Mapped[int]
    settings: Mapped[dict[str, Any]] = mapped_column(doc="every other option of the run")
    versions: Mapped[dict[str, Any]] = mapped_column(doc="package versions that produced it")
    n_documents: Mapped[int] = mapped_column(doc="documents the run covers")
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    model: Mapped[Model] = relationship()
    task: Mapped[Task] = relationship()


class RunDocument(Base):
    """A document a run has finished: written with its evaluations, in one transaction."""

    __tablename__ = "run_documents"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id"), primary_key=True)
    evaluations: Mapped[int] = mapped_column(doc="chains evaluated on it")
    seconds: Mapped[float] = mapped_column(doc="wall time spent on it")
    token_layer_limit: Mapped[int | None] = mapped_column(
        doc="the search's physical limit: distinct chain prefixes evaluated x the document's "
        "distinct token positions (loglikelihood tasks; None otherwise and before schema 0002)"
    )
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """One chain evaluated on one document: its metrics, whether it is correct, and its cost."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("run_id", "document_id", "chain"),
        Index("ix_evaluations_pick", "run_id", "document_id", "score", "length"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id"))
    chain: Mapped[str] = mapped_column(String(2048), doc="canonical text form (chain.py)")
    length: Mapped[int] = mapped_column(doc="layers the chain applies")
    metrics: Mapped[dict[str, Any]] = mapped_column(doc="the task's own metric values")
    score: Mapped[float] = mapped_column(doc="the run's chosen metric")
    correct: Mapped[bool]
    layer_applications: Mapped[int] = mapped_column(doc="rows x layers computed for it")
    token_layer_applications: Mapped[int | None] = mapped_column(
        doc="token positions x layers computed for it (None before schema 0002)"
    )
    seconds: Mapped[float]
    response: Mapped[str | None] = mapped_column(
        String(RESPONSE_LENGTH),
        doc="the answer the chain gave: the chosen option's index (multiple choice) or the "
        "filtered generated answer, cut short; None for other tasks and before schema 0003",
    )
