"""The store's write side: register what was evaluated, and record results a document at a time.

Writers call :meth:`Store.record_document` once per finished document: its evaluations and the
mark that it is done go in one transaction, so a writer killed at any moment leaves whole
documents or nothing, and a resumed run knows exactly which documents remain. Registration
(:meth:`Store.model`, :meth:`Store.task`, :meth:`Store.documents`, :meth:`Store.start_run`) is
get-or-create and safe when several processes do it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lm_eval_cola.chain import Chain
from lm_eval_cola.store import engine as engines
from lm_eval_cola.store.queries import sampled_scheme
from lm_eval_cola.store.schema import (
    FINISHED,
    RUNNING,
    Document,
    Evaluation,
    Model,
    Run,
    RunDocument,
    Task,
    utcnow,
)

if TYPE_CHECKING:  # fingerprint.py imports torch, which `cola db` must not wait for
    from lm_eval_cola.fingerprint import ModelIdentity

VERSIONED_PACKAGES = ("lm-eval-cola", "lm-eval", "torch", "transformers", "optuna", "sqlalchemy")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    version: str | None
    config_hash: str
    split: str | None
    output_type: str


@dataclass(frozen=True)
class DocumentInfo:
    doc_hash: str
    doc_id: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class EvaluationInfo:
    chain: str
    length: int
    metrics: dict[str, Any]
    score: float
    correct: bool
    layer_applications: int = 0
    token_layer_applications: int | None = None
    seconds: float = 0.0
    response: str | None = None


@dataclass(frozen=True)
class RunInfo:
    method: str
    budget: int
    seed: int
    n_documents: int
    space: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def default_run_name(
    task: str, method: str, fingerprint: str, config_hash: str, settings: dict[str, Any]
) -> str:
    """A search run's name unless given one: the task, the method and a hash of the weights,
    the task's configuration and every setting of the search but its document limit (each
    document's search is the same whatever the limit, so a larger limit grows the run)."""
    key = json.dumps([fingerprint, config_hash, settings], sort_keys=True)
    return f"{task}-{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class Store:
    """A chain store at a SQLAlchemy URL or SQLite path, opened for reading and writing."""

    def __init__(self, url: str, read_only: bool = False, create: bool = True) -> None:
        self.url = url
        self.read_only = read_only
        with engines.translated(url):
            self.engine = engines.create(url, read_only=read_only)
            engines.ensure_schema(self.engine, url, create_missing=create and not read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        with engines.translated(self.url), self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return f"store {engines.display(engines.normalise_url(self.url))}"

    def url_for_studies(self) -> str:
        """Where search methods that keep Optuna studies keep them: this store's own database
        (Optuna's tables and version table do not collide with ours), so one URL serves both
        ``cola db`` and ``optuna-dashboard``."""
        return engines.normalise_url(self.url)

    # -- registration (get or create) -------------------------------------------------------

    def model(self, info: ModelIdentity) -> int:
        return self._get_or_create(Model, {"fingerprint": info.fingerprint}, asdict(info))

    def sampled_runs(self, name: str) -> int:
        """Runs of models named ``name`` registered under the earlier ``sampled`` fingerprint
        scheme, which no new search resumes until they are re-registered."""
        with self.session() as session:
            return session.scalar(
                select(func.count(Run.id)).join(Model).where(sampled_scheme(), Model.name == name)
            )

    def task(self, info: TaskInfo) -> int:
        key = {"name": info.name, "config_hash": info.config_hash}
        return self._get_or_create(Task, key, asdict(info))

    def _get_or_create(self, table, key: dict, values: dict) -> int:
        for _ in range(2):  # a concurrent writer may insert between our select and insert
            with self.session() as session:
                found = session.scalar(select(table.id).filter_by(**key))
                if found is not None:
                    return found
            with contextlib.suppress(IntegrityError), self.session() as session:
                row = table(**values)
                session.add(row)
                session.flush()
                return row.id
        raise engines.StoreError(f"{self}: could not register {table.__tablename__} {key}")

    def documents(self, task_id: int, docs: Iterable[DocumentInfo]) -> dict[str, int]:
        """Ids of the task's documents by hash, inserting the ones the store lacks."""
        docs = {doc.doc_hash: doc for doc in docs}
        for _ in range(2):
            known = self._document_ids(task_id)
            missing = [
                {"task_id": task_id, **asdict(doc)} for h, doc in docs.items() if h not in known
            ]
            if not missing:
                return {h: known[h] for h in docs}
            with contextlib.suppress(IntegrityError), self.session() as session:
                session.execute(insert(Document), missing)
        return {h: self._document_ids(task_id)[h] for h in docs}

    def _document_ids(self, task_id: int) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(
                select(Document.doc_hash, Document.id).where(Document.task_id == task_id)
            )
            return dict(rows.all())

    # -- runs -----------------------------------------------------------------------------------

    def start_run(self, model_id: int, task_id: int, info: RunInfo) -> int:
        """A new run, or the unfinished run of the same name and settings (to resume it)."""
        values = {**asdict(info), "model_id": model_id, "task_id": task_id}
        for _ in range(2):  # a process starting the same named run may insert it before us
            resumed = None if info.name is None else self._resume(info.name, values)
            if resumed is not None:
                return resumed
            with contextlib.suppress(IntegrityError), self.session() as session:
                run = Run(**values, versions=software_versions(), status=RUNNING)
                session.add(run)
                session.flush()
                return run.id
        raise engines.StoreError(
            f"{self}: could not start run {info.name or ''} of model {model_id}, task {task_id}"
        )

    def _resume(self, name: str, values: dict) -> int | None:
        """A run grows when resumed with more documents (a larger ``--limit``), never shrinks."""
        with self.session() as session:
            run = session.scalar(select(Run).where(Run.name == name))
            if run is None:
                return None
            self._check_resumable(run, values)
            run.status, run.finished_at = RUNNING, None
            run.n_documents = max(run.n_documents, values["n_documents"])
            return run.id

    def _check_resumable(self, run: Run, values: dict) -> None:
        for key in ("model_id", "task_id", "method", "budget", "seed", "space", "settings"):
            if getattr(run, key) != values[key]:
                raise engines.StoreError(
                    f"{self}: run '{run.name}' exists with another {key} "
                    f"({getattr(run, key)!r}, now {values[key]!r}); resume it with the same "
                    "options or give the new run another name"
                )

    def finish_run(self, run_id: int, status: str = FINISHED) -> None:
        with self.session() as session:
            run = session.get(Run, run_id)
            run.status, run.finished_at = status, utcnow()

    def finish_run_if_done(self, run_id: int) -> bool:
        """Mark the run finished once every document it covers is recorded (by any shard)."""
        with self.session() as session:
            size = session.get(Run, run_id).n_documents
        if len(self.finished_documents(run_id)) < size:
            return False
        self.finish_run(run_id)
        return True

    def run_settings(self, name: str) -> dict | None:
        """The settings of the run of this name, ``None`` when there is none."""
        with self.session() as session:
            return session.scalar(select(Run.settings).where(Run.name == name))

    def finished_documents(self, run_id: int) -> set[int]:
        with self.session() as session:
            ids = session.scalars(
                select(RunDocument.document_id).where(RunDocument.run_id == run_id)
            )
            return set(ids)

    def record_document(
        self,
        run_id: int,
        document_id: int,
        evaluations: list[EvaluationInfo],
        seconds: float,
        token_layer_limit: int | None = None,
    ) -> bool:
        """Write a finished document's evaluations and its done mark, all or nothing.

        Returns False (and writes nothing) when another process already recorded it.
        """
        rows = [
            {"run_id": run_id, "document_id": document_id, **_canonical(e)} for e in evaluations
        ]
        try:
            with self.session() as session:
                session.add(
                    RunDocument(
                        run_id=run_id,
                        document_id=document_id,
                        evaluations=len(rows),
                        seconds=seconds,
                        token_layer_limit=token_layer_limit,
                    )
                )
                session.flush()
                if rows:
                    session.execute(insert(Evaluation), rows)
        except IntegrityError:
            return False
        return True

    def reregister(self, sampled: str, identity: ModelIdentity) -> str:
        """Move the model registered under its ``sampled`` fingerprint (an earlier release's
        scheme) to ``identity``'s; its runs follow, and a run named by default is renamed as a
        search with today's fingerprint names it, so the same command resumes it. Returns what
        it did, in words."""
        with self.session() as session:
            old = session.scalar(select(Model).where(Model.fingerprint == sampled))
            if old is None:
                return f"{self}: nothing registered under this model's sampled fingerprint"
            current = session.scalar(select(Model).where(Model.fingerprint == identity.fingerprint))
            if current is None:
                old.fingerprint, model_id = identity.fingerprint, old.id
            else:  # a search since the upgrade registered the model anew: its runs join that row
                session.execute(
                    update(Run).where(Run.model_id == old.id).values(model_id=current.id)
                )
                session.delete(old)
                model_id = current.id
            runs = session.scalars(select(Run).where(Run.model_id == model_id)).all()
            notes = [_rename(session, run, sampled, identity.fingerprint) for run in runs]
        renamed = [note for note in notes if note]
        return "\n  ".join(
            [f"{self}: {len(runs)} run(s) of {identity.name} re-registered", *renamed]
        )


def _rename(session: Session, run: Run, sampled: str, fingerprint: str) -> str | None:
    """Give a run named by default the name a search of today's fingerprint gives it."""
    settings = {"method": run.method, "budget": run.budget, "seed": run.seed, **run.settings}
    task, config = run.task.name, run.task.config_hash
    if run.name != default_run_name(task, run.method, sampled, config, settings):
        return None  # named by its user: the name stays
    new = default_run_name(task, run.method, fingerprint, config, settings)
    if session.scalar(select(Run.id).where(Run.name == new)) is not None:
        return f"run {run.id} keeps its name {run.name}: a run named {new} exists already"
    old, run.name = run.name, new
    return f"run {run.id} renamed {old} -> {new}"


def _canonical(evaluation: EvaluationInfo) -> dict:
    """The row of an evaluation, its chain in canonical text (the queries match on it)."""
    chain = Chain.parse(evaluation.chain)
    return {**asdict(evaluation), "chain": str(chain), "length": len(chain)}


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
