"""The chain store's reliability: the schema is what the migrations create, writers killed with
SIGKILL leave whole documents, concurrent writer processes lose no rows, and a store that cannot
be used says why instead of failing deep inside SQLAlchemy or answering with nothing.

Writers are real processes, forked from a forkserver that has already imported the store (a
fresh interpreter spends seconds importing torch). PostgreSQL tests run against
``COLA_TEST_POSTGRES_URL`` (``.ci/run`` starts a server), each in a schema of its own that is
dropped afterwards; without a reachable server they skip and say so.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, func, select, text

from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.store import engine as engines
from lm_eval_cola.store import queries
from lm_eval_cola.store.schema import (
    RESPONSE_LENGTH,
    Base,
    Document,
    Evaluation,
    Model,
    Run,
    RunDocument,
    Task,
)
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo

MODEL = ModelIdentity("tiny", None, "llama", 4, "float32", "ab" * 32)
TASK = TaskInfo("cola_mc", "1.0", "0" * 64, "test", "multiple_choice")
OTHER_TASK = TaskInfo("other", None, "1" * 64, None, "generate_until")
#: Documents registered by every writer.
DOCUMENTS = 400
#: Documents of the run that writers are killed in: far more than they get through (about 6 ms
#: a document here), so every writer is still at work when it is killed.
KILLED_RUN_DOCUMENTS = 3000
#: Evaluations per document: enough that a writer spends most of its time inside a transaction.
EVALUATIONS = 300
#: Documents every concurrent writer tries to record; exactly one must succeed for each.
CONTESTED = 8
#: Evaluations per document in the concurrent-writer tests.
SHARE_EVALUATIONS = 50


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "cola.db")
    return request.getfixturevalue("postgres_url")


# -- writers (run in their own processes) -----------------------------------------------------


def processes() -> BaseContext:
    """Writer processes forked from a server that has imported the store and this module."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lm_eval_cola.store.store", "tests.test_store"])
    return context


def doc_hash(index: int) -> str:
    return hashlib.sha256(f"document {index}".encode()).hexdigest()


def evaluations(index: int, count: int = EVALUATIONS) -> list[EvaluationInfo]:
    return [
        EvaluationInfo(
            chain=f"0-{k}",
            length=k + 1,
            metrics={"acc": float(k % 3 == 0)},
            score=(index * 31 + k * 17) % 101 / 100,
            correct=k % 3 == 0,
        )
        for k in range(count)
    ]


def register(store: Store, run_name: str, documents: int = DOCUMENTS) -> tuple[int, list[int]]:
    """What every writer registers first, the same in each (get-or-create): the run's id and
    its documents' ids in index order."""
    model_id, task_id = store.model(MODEL), store.task(TASK)
    docs = [DocumentInfo(doc_hash(i), i, {"question": f"q{i}"}) for i in range(documents)]
    ids = store.documents(task_id, docs)
    info = RunInfo("grid", EVALUATIONS, 0, documents, name=run_name)
    return store.start_run(model_id, task_id, info), [ids[doc.doc_hash] for doc in docs]


def write_until_killed(url: str, started: Event, recorded: Event) -> None:
    """Resume the run and record its remaining documents, one transaction each; ``recorded``
    is set once a document is in."""
    started.set()
    with Store(url) as store:
        run_id, ids = register(store, "killed", KILLED_RUN_DOCUMENTS)
        done = store.finished_documents(run_id)
        for index, document_id in enumerate(ids):
            if document_id not in done:
                store.record_document(run_id, document_id, evaluations(index), seconds=0.0)
                recorded.set()


def die_before(url: str, statement: str) -> None:
    """Register and record one document, SIGKILLing this process just before the first SQL
    statement that starts with ``statement``."""

    def kill_on(_conn, _cursor, sql: str, *_args) -> None:
        if sql.lstrip().upper().startswith(statement):
            os.kill(os.getpid(), signal.SIGKILL)

    event.listen(Engine, "before_cursor_execute", kill_on)
    with Store(url) as store:
        run_id, ids = register(store, "killed")
        store.record_document(run_id, ids[0], evaluations(0), seconds=0.0)


def write_share(url: str, barrier: Barrier, writers: int, index: int, results: Queue) -> None:
    """One of ``writers`` processes of one run: all start together, register the same things,
    all try to record the first few documents, then each records its own share."""
    barrier.wait()
    with Store(url) as store:
        run_id, ids = register(store, "shared")
        won = [i for i in range(CONTESTED) if record_share(store, run_id, ids[i], i)]
        for i in range(CONTESTED + index, DOCUMENTS, writers):
            assert record_share(store, run_id, ids[i], i), f"document {i} is this writer's alone"
    results.put((run_id, won))


def record_share(store: Store, run_id: int, document_id: int, index: int) -> bool:
    evaluated = evaluations(index, SHARE_EVALUATIONS)
    return store.record_document(run_id, document_id, evaluated, seconds=0.0)


# -- checks -----------------------------------------------------------------------------------


def counts(url: str) -> dict[str, int]:
    """Rows per table, read through a read-only store (it must open, too)."""
    with Store(url, read_only=True) as store, store.session() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table))
            for table in (Model, Task, Document, Run, RunDocument, Evaluation)
        }


def assert_whole_documents(url: str, expected: int) -> int:
    """Every document has its done mark and all ``expected`` evaluations, or neither of them;
    returns how many are done."""
    with Store(url) as store, store.session() as session:
        marks = dict(
            session.execute(select(RunDocument.document_id, RunDocument.evaluations)).all()
        )
        rows = dict(
            session.execute(
                select(Evaluation.document_id, func.count()).group_by(Evaluation.document_id)
            ).all()
        )
        if session.bind.dialect.name == "sqlite":
            assert session.scalar(text("PRAGMA integrity_check")) == "ok"
    assert rows == marks, "a document has evaluations without its done mark, or the reverse"
    assert set(marks.values()) <= {expected}
    return len(marks)


# -- the schema -------------------------------------------------------------------------------


def test_orm_schema_is_what_the_migrations_create(store_url: str) -> None:
    """schema.py and the migrations must not drift: a store created by the migrations has
    exactly the tables, columns, types, constraints and indexes the ORM declares."""
    with Store(store_url) as store, store.engine.connect() as connection:
        options = {"compare_type": True, "version_table": engines.VERSION_TABLE}
        context = MigrationContext.configure(connection, opts=options)
        assert compare_metadata(context, Base.metadata) == []


# -- SIGKILL ----------------------------------------------------------------------------------


def test_writers_killed_at_random_moments_leave_whole_documents(store_url: str) -> None:
    """Six writers in turn resume one run and are SIGKILLed at random moments (opening or
    creating the store, registering, or in the middle of a document). The last one's moment
    comes after it recorded a document, so the run is sure to have progressed on a slow
    machine too."""
    context, rng = processes(), random.Random()
    delays = [rng.uniform(0.0, 0.5) for _ in range(6)]
    for number, delay in enumerate(delays, start=1):
        started, recorded = context.Event(), context.Event()
        args = (store_url, started, recorded)
        writer = context.Process(target=write_until_killed, args=args)
        writer.start()
        assert started.wait(30)
        if number == len(delays):
            assert recorded.wait(120), "the last writer recorded no document in 120 s"
        writer.join(delay)
        writer.kill()
        writer.join()
        assert writer.exitcode == -signal.SIGKILL, f"the writer died before its kill ({delays})"
    done = assert_whole_documents(store_url, EVALUATIONS)
    assert 0 < done < KILLED_RUN_DOCUMENTS, f"kills after {delays} s: {done} documents done"


@pytest.mark.parametrize(
    "statement",
    ["CREATE INDEX", "INSERT INTO EVALUATIONS"],
    ids=["mid-migration", "after-the-done-mark"],
)
def test_a_writer_killed_at_the_worst_moment_leaves_nothing(store_url: str, statement: str):
    """Killed while creating the store (tables made, version not yet stamped) or after a
    document's done mark but before its evaluations: none of it may remain, and the next
    writer finds a usable store and records the document."""
    writer = processes().Process(target=die_before, args=(store_url, statement))
    writer.start()
    writer.join(30)
    assert writer.exitcode == -signal.SIGKILL
    assert assert_whole_documents(store_url, EVALUATIONS) == 0
    with Store(store_url) as store:
        run_id, ids = register(store, "killed")
        assert store.record_document(run_id, ids[0], evaluations(0), seconds=0.0)
    assert assert_whole_documents(store_url, EVALUATIONS) == 1


# -- concurrent writers -----------------------------------------------------------------------


def write_concurrently(url: str, writers: int) -> None:
    """``writers`` processes create the store, register and record one run at the same time;
    every row must be there exactly once."""
    context = processes()
    barrier, results = context.Barrier(writers), context.Queue()
    jobs = [
        context.Process(target=write_share, args=(url, barrier, writers, i, results))
        for i in range(writers)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in jobs]
    assert len({run_id for run_id, _ in outcomes}) == 1, "each writer started its own run"
    winners = sorted(i for _, won in outcomes for i in won)
    assert winners == list(range(CONTESTED)), "a contested document was recorded 0 or 2 times"
    assert counts(url) == {
        "models": 1,
        "tasks": 1,
        "documents": DOCUMENTS,
        "runs": 1,
        "run_documents": DOCUMENTS,
        "evaluations": DOCUMENTS * SHARE_EVALUATIONS,
    }


def test_two_sqlite_writers_lose_no_rows(tmp_path: Path) -> None:
    write_concurrently(str(tmp_path / "cola.db"), writers=2)


def test_four_postgresql_writers_lose_no_rows(postgres_url: str) -> None:
    write_concurrently(postgres_url, writers=4)


# -- stores that cannot be used ---------------------------------------------------------------


def test_locked_store_says_so_and_names_the_store(tmp_path: Path, monkeypatch) -> None:
    """Another connection holds the write lock past the busy timeout: StoreLocked, naming the
    file; readers still read meanwhile (WAL)."""
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        store.task(TASK)
    monkeypatch.setattr(engines, "BUSY_TIMEOUT_S", 1)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        locked = rf"{re.escape(path)} is locked .* 1 s"
        with pytest.raises(engines.StoreLocked, match=locked), Store(path) as store:
            store.task(OTHER_TASK)
        assert counts(path)["tasks"] == 1
    finally:
        holder.close()


def test_a_writer_waits_for_another_writers_lock(tmp_path: Path) -> None:
    """Another connection holds the write lock for half a second: the writer waits it out
    (the busy timeout) instead of failing at once."""
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        store.task(TASK)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, holder.rollback)
    release.start()
    try:
        with Store(path) as store:
            store.task(OTHER_TASK)
    finally:
        release.join()
        holder.close()
    assert counts(path)["tasks"] == 2


@contextlib.contextmanager
def read_only_file(path: str) -> Iterator[None]:
    """Make ``path`` read-only for this process. Permission bits do not stop root, so as root
    the file is made immutable (``chattr +i``) instead, or the test skips if that fails."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)
        return
    chattr = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    if chattr.returncode:
        pytest.skip(f"as root only 'chattr +i' denies writes, and it failed: {chattr.stderr}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("chattr"), reason="root, no chattr")
def test_read_only_file_says_so(tmp_path: Path) -> None:
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        store.task(TASK)
    with read_only_file(path):
        read_only = rf"{re.escape(path)} is read-only"
        with pytest.raises(engines.StoreReadOnly, match=read_only), Store(path) as store:
            store.task(OTHER_TASK)
        assert counts(path)["tasks"] == 1


def test_read_only_store_refuses_writes(store_url: str) -> None:
    """A store opened read-only (SQLite query_only, PostgreSQL read-only transactions) refuses
    a write with StoreReadOnly, not a driver error."""
    Store(store_url).close()
    with Store(store_url, read_only=True) as store, pytest.raises(engines.StoreReadOnly):
        store.task(TASK)


def small_store(path: str) -> int:
    """A store with one finished run of 40 documents; returns the run's id."""
    with Store(path) as store:
        run_id, ids = register(store, "small")
        for index, document_id in enumerate(ids[:40]):
            store.record_document(run_id, document_id, evaluations(index, 100), seconds=0.0)
    return run_id


def read_everything(path: str, run_id: int) -> None:
    with Store(path, read_only=True) as store, store.session() as session:
        queries.pick(session, [run_id])
        queries.stats(session, run_id)


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_corrupt_file_says_so(tmp_path: Path, damage: str) -> None:
    """Garbage, or a real store cut short: StoreCorrupt, never fewer rows without a word."""
    path = str(tmp_path / "cola.db")
    run_id = small_store(path)
    data = Path(path).read_bytes()
    damaged = os.urandom(len(data)) if damage == "random bytes" else data[: len(data) // 2]
    Path(path).write_bytes(damaged)
    with pytest.raises(engines.StoreCorrupt, match=re.escape(path)):
        read_everything(path, run_id)
    with pytest.raises(engines.StoreCorrupt, match=re.escape(path)):
        Store(path).close()


def test_another_sqlite_database_is_not_taken_for_a_store(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.db")
    with contextlib.closing(sqlite3.connect(path)) as notes:
        notes.execute("CREATE TABLE notes (text TEXT)")
    for read_only in (False, True):
        with pytest.raises(engines.StoreError, match=r"not an lm-eval-cola store \(tables: notes"):
            Store(path, read_only=read_only)
    with contextlib.closing(sqlite3.connect(path)) as notes:
        tables = notes.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("notes",)], "opening it must not have added the store's tables"


def test_reading_a_missing_or_empty_store_is_an_error(tmp_path: Path) -> None:
    """A typo in --store must not read as a store with no runs."""
    missing, empty = tmp_path / "missing.db", tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(engines.StoreError, match="does not exist"):
        Store(str(missing), read_only=True)
    with pytest.raises(engines.StoreError, match=r"not an lm-eval-cola store \(tables: none\)"):
        Store(str(empty), read_only=True)


# -- schema versions --------------------------------------------------------------------------


def test_older_store_names_the_command_that_upgrades_it(tmp_path, monkeypatch, next_release):
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        store.task(TASK)
    monkeypatch.setattr(engines, "MIGRATIONS", next_release)
    upgrade = f"cola db upgrade --store {path}"
    with pytest.raises(engines.StoreOutdated, match=re.escape(upgrade)):
        Store(path)
    engine = engines.create(path)
    assert engines.upgrade(engine) == ("0003", "0099")
    engine.dispose()
    assert counts(path)["tasks"] == 1, "upgrading keeps the rows"


def test_newer_store_is_refused(tmp_path, monkeypatch, next_release) -> None:
    path = str(tmp_path / "cola.db")
    with monkeypatch.context() as newer:
        newer.setattr(engines, "MIGRATIONS", next_release)
        Store(path).close()
    with pytest.raises(engines.StoreError, match="written by a newer lm-eval-cola"):
        Store(path)


def test_paths_with_url_characters_name_exactly_that_file(tmp_path: Path) -> None:
    folder = tmp_path / "we#ird?dir%41"
    folder.mkdir()
    path = folder / "cola.db"
    with Store(str(path)) as store:
        store.task(TASK)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    assert counts(str(path))["tasks"] == 1
    with pytest.raises(engines.StoreError, match="does not exist"):
        Store(str(folder / "missing.db"), read_only=True)
    assert not (folder / "missing.db").exists()


def test_chains_are_stored_in_canonical_form(tmp_path: Path) -> None:
    path = str(tmp_path / "cola.db")
    with Store(path) as store:
        run_id, (document, *_) = register(store, "canonical", documents=1)
        written = EvaluationInfo("0.1.2.3", 99, {}, 1.0, True)
        store.record_document(run_id, document, [written], seconds=0.0)
        with store.session() as session:
            row = session.scalars(select(Evaluation)).one()
    assert (row.chain, row.length) == ("0-3", 4)


def release(tmp_path: Path, last: str) -> Path:
    """The migrations of the release whose newest schema was ``last``."""
    folder = tmp_path / f"migrations-{last}"
    shutil.copytree(engines.MIGRATIONS, folder, ignore=shutil.ignore_patterns("__py*"))
    for migration in (folder / "versions").glob("*.py"):
        if migration.name[:4] > last:
            migration.unlink()
    return folder


def test_a_store_of_schema_0001_upgrades_keeping_every_evaluation(tmp_path, monkeypatch):
    """Stores searched before token-layer counting (schema 0001) upgrade in place: their rows
    stay, and the new counts read as unknown (NULL), never as zero."""
    first_release = release(tmp_path, "0001")
    path = str(tmp_path / "old.db")
    with monkeypatch.context() as old:
        old.setattr(engines, "MIGRATIONS", first_release)
        with Store(path) as store:
            model_id, task_id = store.model(MODEL), store.task(TASK)
            (document_id,) = store.documents(task_id, [DocumentInfo("d" * 64, 0, {})]).values()
            run_id = store.start_run(model_id, task_id, RunInfo("mcts", 2, 0, 1, name="old"))
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(
            "INSERT INTO run_documents VALUES (?, ?, 1, 0.5, '2026-11-01 00:00:00')",
            (run_id, document_id),
        )
        connection.execute(
            "INSERT INTO evaluations (run_id, document_id, chain, length, metrics, score, "
            "correct, layer_applications, seconds) VALUES (?, ?, '0-3', 4, '{}', 1.0, 1, 16, 0.5)",
            (run_id, document_id),
        )
    with pytest.raises(engines.StoreOutdated, match="cola db upgrade"):
        Store(path)
    engine = engines.create(path)
    assert engines.upgrade(engine) == ("0001", engines.head_revision())
    engine.dispose()
    with Store(path, read_only=True) as store, store.session() as session:
        (evaluation,) = session.scalars(select(Evaluation)).all()
        assert (evaluation.layer_applications, evaluation.token_layer_applications) == (16, None)
        assert session.scalars(select(RunDocument.token_layer_limit)).all() == [None]
        stats = queries.stats(session, run_id)
    assert stats.original_accuracy == 1.0 and stats.token_layer_applications is None
    assert evaluation.response is None and stats.mean_distinct_answers is None


def test_a_store_of_schema_0002_upgrades_with_empty_responses(tmp_path, monkeypatch):
    """Stores searched before answers were kept (schema 0002) upgrade in place: every row and
    value stays, and each evaluation's answer reads as unknown (NULL)."""
    path = str(tmp_path / "old.db")
    with monkeypatch.context() as old:
        old.setattr(engines, "MIGRATIONS", release(tmp_path, "0002"))
        with Store(path) as store:
            run_id, documents = register(store, "before-answers", documents=2)
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            for document in documents:
                connection.execute(
                    "INSERT INTO run_documents (run_id, document_id, evaluations, seconds, "
                    "token_layer_limit, finished_at) VALUES (?, ?, 1, 0.5, 40, '2026-12-01')",
                    (run_id, document),
                )
                connection.execute(
                    "INSERT INTO evaluations (run_id, document_id, chain, length, metrics, "
                    "score, correct, layer_applications, token_layer_applications, seconds) "
                    """VALUES (?, ?, '0-3', 4, '{"acc": 1.0}', 1.0, 1, 16, 40, 0.5)""",
                    (run_id, document),
                )
        before = counts(path)
    with pytest.raises(engines.StoreOutdated, match="cola db upgrade"):
        Store(path)
    engine = engines.create(path)
    assert engines.upgrade(engine) == ("0002", "0003")
    engine.dispose()
    assert counts(path) == before
    with Store(path, read_only=True) as store, store.session() as session:
        rows = queries.evaluations(session, [run_id])
        stats = queries.stats(session, run_id)
    assert [(r.chain, r.score, r.correct, r.metrics, r.response) for r in rows] == [
        ("0-3", 1.0, True, {"acc": 1.0}, None)
    ] * 2
    assert stats.token_layer_applications == 80 and stats.answer_diversity == {}


def test_responses_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "cola.db")
    long_answer = "x" * RESPONSE_LENGTH
    answers = ["2", " 42 apples", long_answer, None]
    with Store(path) as store:
        run_id, (document, *_) = register(store, "answers", documents=1)
        written = [
            EvaluationInfo(chain, 4, {}, 1.0, True, response=answer)
            for chain, answer in zip(["0-3", "0-2", "1-3", "0.2.3"], answers, strict=True)
        ]
        store.record_document(run_id, document, written, seconds=0.0)
        with store.session() as session:
            read = {r.chain: r.response for r in queries.evaluations(session, [run_id])}
            stats = queries.stats(session, run_id)
    assert read == {"0-3": "2", "0-2": " 42 apples", "1-3": long_answer, "0.2-3": None}
    assert stats.answer_diversity == {3: 1} and stats.mean_distinct_answers == 3.0
