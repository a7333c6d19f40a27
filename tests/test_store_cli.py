"""``cola db`` and ``frames``: the store's answers, checked against numbers worked out by hand.

The store holds a 4-layer model, one task of 6 documents and three runs: ``grid`` (finished,
every document, the identity chain ``0-3`` on each), ``mcts-a`` (2 of 6 documents done, one of
them without the identity chain) and an unnamed ``tpe`` run with nothing recorded yet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lm_eval_cola.chain import Chain
from lm_eval_cola.cli import main
from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.store import cli as store_cli
from lm_eval_cola.store import engine as engines
from lm_eval_cola.store import frames, queries
from lm_eval_cola.store.engine import StoreError
from lm_eval_cola.store.schema import Run
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo

MODEL = ModelIdentity("tiny", None, "llama", 4, "float32", "cd" * 32)
TASK = TaskInfo("cola_mc", "1.0", "0" * 64, "test", "multiple_choice")
#: Per document of run ``grid``: (chain, score, correct); ``0-3`` is the identity chain.
GRID = [
    [("0-3", 1.0, True), ("0-2", 1.0, True), ("0.1.1.3", 0.0, False)],
    [("0-3", 1.0, True), ("0-2", 0.2, False), ("0.2.3", 0.1, False)],
    [("0-3", 0.9, True), ("1-3", 0.8, True), ("0.1.1.2.3", 0.95, True)],
    [("0-3", 0.3, False), ("0.1.1.2.3", 0.7, True), ("0.3", 0.1, False)],
    [("0-3", 0.4, False), ("0.2.3", 0.6, True)],
    [("0-3", 0.2, False), ("1-3", 0.3, False)],
]
#: Run ``mcts-a``: documents 0 and 1 only, document 0 without the identity chain.
MCTS = [[("0-2", 1.0, True)], [("0-3", 1.0, True), ("1-3", 0.0, False)]]
#: Each document's pick in ``grid``: best is the highest score, then the shortest chain;
#: shortest-correct leaves document 5 out (no correct chain).
BEST = ["0-2", "0-3", "0-1.1-3", "0-1.1-3", "0.2-3", "1-3"]
SHORTEST_CORRECT = ["0-2", "0-3", "1-3", "0-1.1-3", "0.2-3"]
#: The paper's questions for ``grid``, worked out from GRID and BEST.
STATS = {
    "run_id": 1,
    "documents": 6,
    "original_accuracy": 3 / 6,  # documents 0-2
    "oracle_accuracy": 5 / 6,  # all but document 5
    "shorter_correct_share": 2 / 3,  # documents 0 (0-2) and 2 (1-3) of 0-2
    "corrected_share": 2 / 3,  # documents 3 and 4 of 3-5
    "mean_chosen_length": (3 + 4 + 5 + 5 + 3 + 3) / 6,
    "n_layers": 4,
    "usage": [5 / 6, 7 / 6, 1.0, 5 / 6],  # applications per best chain, e.g. layer 1: 1+1+2+2+0+1
    "skip_rate": [1 / 6, 1 / 6, 0.0, 1 / 6],  # layer 0: 1-3; layer 1: 0.2-3; layer 3: 0-2
    "repeat_rate": [0.0, 2 / 6, 0.0, 0.0],  # layer 1 twice in 0-1.1-3, documents 2 and 3
    # 10 tokens a layer; each document's limit is recorded as 100 token-layers
    "token_layer_applications": 10 * sum(len(Chain.parse(c)) for doc in GRID for c, *_ in doc),
    "token_layer_limit": 100 * 6,
    # each evaluation answers "A" when correct, else "B": documents 2 and 5 got one answer
    "answer_diversity": {1: 2, 2: 4},
    "mean_distinct_answers": (1 + 1 + 2 * 4) / 6,
}


def evaluation(chain: str, score: float, correct: bool) -> EvaluationInfo:
    parsed = Chain.parse(chain)
    metrics = {"acc": float(correct), "acc_norm": score}
    return EvaluationInfo(
        str(parsed),
        len(parsed),
        metrics,
        score,
        correct,
        token_layer_applications=10 * len(parsed),
        response="A" if correct else "B",
    )


def fill(url: str) -> None:
    """Write the three runs described in the module docstring into a new store at ``url``."""
    with Store(url) as store:
        model_id, task_id = store.model(MODEL), store.task(TASK)
        docs = [
            DocumentInfo(hashlib.sha256(f"doc {i}".encode()).hexdigest(), i, {"q": f"q{i}"})
            for i in range(len(GRID))
        ]
        ids = list(store.documents(task_id, docs).values())
        for name, method, budget, done in (("grid", "grid", 4, GRID), ("mcts-a", "mcts", 2, MCTS)):
            run_id = store.start_run(model_id, task_id, RunInfo(method, budget, 0, 6, name=name))
            for document_id, chains in zip(ids[: len(done)], done, strict=True):
                evaluations = [evaluation(*chain) for chain in chains]
                store.record_document(run_id, document_id, evaluations, 0.5, token_layer_limit=100)
        store.finish_run(1)
        store.start_run(model_id, task_id, RunInfo("tpe", 8, 2, 6))


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    """The store as an SQLite file, shared by the tests that only read it."""
    path = str(tmp_path_factory.mktemp("store") / "cola.db")
    fill(path)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store on each backend (PostgreSQL tests skip without a server, as in test_store)."""
    if request.param == "sqlite":
        url = str(tmp_path / "cola.db")
    else:
        url = request.getfixturevalue("postgres_url")
    fill(url)
    return url


def cola(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``cola ARGV`` in this process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- frames -----------------------------------------------------------------------------------


def test_runs_frame_has_progress_and_headline_numbers(url: str) -> None:
    runs = frames.runs(url).set_index("id")
    assert list(runs.index) == [1, 2, 3]
    assert list(runs["name"].fillna("")) == ["grid", "mcts-a", ""]
    assert list(runs["status"]) == ["finished", "running", "running"]
    assert list(runs["done"]) == [6, 2, 0]
    assert list(runs["n_documents"]) == [6, 6, 6]
    last = runs["last_document_at"]
    assert runs.loc[1, "started_at"] <= last[1] <= runs.loc[2, "started_at"] <= last[2]
    assert pd.isna(last[3])  # the tpe run has finished no document
    assert list(runs["evaluations"]) == [16, 3, 0]
    assert list(runs["model"]) == ["tiny"] * 3 and list(runs["task"]) == ["cola_mc"] * 3
    # mcts-a: only document 1 has the identity chain; both documents have a correct chain
    assert runs["original_accuracy"].tolist()[:2] == pytest.approx([0.5, 1.0])
    assert runs["oracle_accuracy"].tolist()[:2] == pytest.approx([5 / 6, 1.0])
    assert runs.loc[3, ["original_accuracy", "oracle_accuracy"]].isna().all()
    assert runs.loc[1, "finished_at"] >= runs.loc[1, "started_at"]
    assert pd.isna(runs.loc[2, "finished_at"])


def test_stats_frames_answer_the_papers_questions(url: str) -> None:
    row = frames.stats(url, run_id=1).iloc[0].to_dict()
    scalars = {k: v for k, v in STATS.items() if not isinstance(v, list | dict)}
    assert row == pytest.approx(scalars)
    rates = frames.layer_rates(url, "grid")
    assert list(rates["layer"]) == [0, 1, 2, 3]
    assert rates["usage"].tolist() == pytest.approx(STATS["usage"])
    assert rates["skip_rate"].tolist() == pytest.approx(STATS["skip_rate"])
    assert rates["repeat_rate"].tolist() == pytest.approx(STATS["repeat_rate"])


def test_chains_frame_picks_and_lists(path: str) -> None:
    best = frames.chains(path, [1])
    assert list(best["chain"]) == BEST and list(best["doc_id"]) == list(range(6))
    assert list(best.columns) == [
        *("run_id", "task", "doc_id", "doc_hash", "chain", "length", "score", "correct"),
        *("response", "metrics.acc", "metrics.acc_norm"),
    ]
    assert list(best["length"]) == [len(Chain.parse(c)) for c in BEST]
    assert (best["metrics.acc_norm"] == best["score"]).all()
    shortest = frames.chains(path, "grid", pick="shortest-correct")
    assert list(shortest["chain"]) == SHORTEST_CORRECT and shortest["correct"].all()
    everything = frames.chains(path, ["grid"], pick=None)
    assert len(everything) == sum(map(len, GRID))
    first = everything.groupby("doc_id").head(1)
    assert list(first["chain"]) == BEST, "a document's best evaluation comes first"
    both = frames.chains(path, [1, "mcts-a"], pick=None)
    assert sorted(set(both["run_id"])) == [1, 2] and len(both) == 16 + 3
    assert frames.chains(path, 3).empty


def test_frames_take_an_open_store_and_leave_it_open(path: str) -> None:
    with Store(path, read_only=True) as store:
        assert len(frames.runs(store)) == 3
        assert len(frames.runs(store)) == 3


def test_frames_refuse_unknown_runs_and_tables(path: str) -> None:
    with pytest.raises(StoreError, match="has no run '99', 'nope'"):
        frames.chains(path, [1, 99, "nope"])
    with pytest.raises(StoreError, match="has no run '7'"):
        frames.stats(path, run_id=7)
    with pytest.raises(StoreError, match="no table secrets: its tables are models, tasks"):
        frames.table(path, "secrets")


def test_table_frames_hold_json_as_text(path: str) -> None:
    runs = frames.table(path, "runs")
    assert list(runs.columns) == list(Run.__table__.c.keys())
    assert json.loads(runs.loc[0, "versions"])["python"]
    evaluations = frames.table(path, "evaluations")
    assert len(evaluations) == 19
    assert json.loads(evaluations.loc[0, "metrics"]) == {"acc": 1.0, "acc_norm": 1.0}


def test_tables_take_one_name_as_well_as_several(path: str) -> None:
    one = frames.tables(path, "runs")
    assert list(one) == ["runs"]
    pd.testing.assert_frame_equal(one["runs"], frames.tables(path, ["runs", "models"])["runs"])


# -- cola db runs / stats / chains ------------------------------------------------------------


def test_runs_command(url: str, capsys) -> None:
    status, out, err = cola(capsys, "db", "runs", "--store", url)
    assert status == 0 and not err
    header, *rows = out.splitlines()
    assert header.split() == [
        *("id", "name", "method", "model", "task", "status", "budget", "done"),
        *("evaluations", "original", "oracle", "controls", "started", "last", "document"),
    ]
    cells = [row.split()[:12] for row in rows]
    assert cells[0] == [
        *("1", "grid", "grid", "tiny", "cola_mc", "finished", "4", "6/6", "16", "0.500"),
        *("0.833", "none"),
    ]
    mcts = ("mcts-a", "mcts", "tiny", "cola_mc", "running", "2", "2/6", "3", "1.000", "1.000")
    assert cells[1][1:] == [*mcts, "none"]
    tpe = ("-", "tpe", "tiny", "cola_mc", "running", "8", "0/6", "0", "-", "-", "none")
    assert cells[2][1:] == list(tpe)
    # when each run last finished a document: never, for the tpe run
    assert rows[2].split()[-1] == "-" and re.fullmatch(r"\d\d:\d\d", rows[1].split()[-1])
    status, out, _ = cola(capsys, "db", "runs", "--store", url, "--format", "json")
    listed = json.loads(out)
    assert status == 0 and [run["done"] for run in listed] == [6, 2, 0]
    assert listed[0]["oracle_accuracy"] == pytest.approx(5 / 6) and listed[0]["n_layers"] == 4


def test_stats_command(path: str, capsys) -> None:
    status, out, err = cola(capsys, "db", "stats", "--store", path, "--run", "grid")
    assert status == 0 and not err
    values = dict(re.findall(r"^  (.+?)  +(\S.*)$", out, re.MULTILINE))
    assert values == {
        "original accuracy (chain 0-3)": "0.500",
        "oracle accuracy (some chain correct)": "0.833",
        "originally correct with a shorter correct chain": "0.667",
        "originally wrong that some chain corrects": "0.667",
        "mean length of the best chains": "3.83 (model depth 4)",
        "token-layer applications computed": "580 (0.97x the physical limit, 600)",
        "distinct answers among a document's chains": "1.67 on average (documents by "
        "answers: 1: 2, 2: 4)",
    }
    assert out.startswith("run 1: 6 documents evaluated")
    layers = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-4:]}
    assert layers == {
        "layer": ["0", "1", "2", "3"],
        "usage": ["0.83", "1.17", "1.00", "0.83"],
        "skip": ["0.17", "0.17", "0.00", "0.17"],
        "repeat": ["0.00", "0.33", "0.00", "0.00"],
    }
    status, out, _ = cola(capsys, "db", "stats", "--store", path, "--run", "1", "--format", "json")
    assert status == 0
    answers = json.loads(out)
    answers["answer_diversity"] = {int(n): d for n, d in answers["answer_diversity"].items()}
    for key, value in STATS.items():
        assert answers[key] == pytest.approx(value), key


def test_stats_of_a_run_without_the_identity_chain_says_so(path: str, capsys) -> None:
    status, out, _ = cola(capsys, "db", "stats", "--store", path, "--run", "3")
    assert status == 0
    assert "run 3: 0 documents evaluated" in out
    assert re.search(r"original accuracy \(chain 0-3\) +-$", out, re.MULTILINE)
    assert re.search(r"distinct answers among a document's chains +not recorded", out)


def test_chains_command_formats(path: str, capsys, tmp_path: Path) -> None:
    status, out, _ = cola(capsys, "db", "chains", "--store", path, "--run", "1", "--format", "csv")
    assert status == 0
    written = pd.read_csv(io.StringIO(out))
    pd.testing.assert_frame_equal(written, frames.chains(path, [1]), check_dtype=False)
    argv = ["db", "chains", "--store", path, "--run", "grid", "--pick", "shortest-correct"]
    status, out, _ = cola(capsys, *argv, "--format", "json")
    assert [row["chain"] for row in json.loads(out)] == SHORTEST_CORRECT
    status, out, _ = cola(capsys, *argv)
    assert [line.split()[4] for line in out.splitlines()[1:]] == SHORTEST_CORRECT
    target = tmp_path / "all.json"
    argv = ["db", "chains", "--store", path, "--run", "1", "--run", "mcts-a", "--all"]
    status, out, _ = cola(capsys, *argv, "--format", "json", "--output", str(target))
    assert status == 0 and out == f"19 chains -> {target}\n"
    assert len(json.loads(target.read_text())) == 19
    status, out, _ = cola(capsys, "db", "chains", "--store", path, "--run", "3")
    assert status == 0 and out == "(no rows)\n"


def test_pick_choices_are_the_stores_policies() -> None:
    assert tuple(queries.PICKS) == store_cli.PICKS


# -- cola db sql ------------------------------------------------------------------------------


def test_sql_command_reads(url: str, capsys) -> None:
    query = "SELECT chain, COUNT(*) AS n FROM evaluations GROUP BY chain ORDER BY n DESC, chain"
    status, out, _ = cola(capsys, "db", "sql", "--store", url, query, "--format", "json")
    assert status == 0
    assert json.loads(out)[:3] == [
        {"chain": "0-3", "n": 7},  # grid: 6, mcts-a: 1
        {"chain": "0-2", "n": 3},
        {"chain": "1-3", "n": 3},
    ]
    query = "SELECT name AS \"name:%\" FROM runs WHERE name LIKE 'mcts%'"
    status, out, _ = cola(capsys, "db", "sql", "--store", url, query)
    assert out.split() == ["name:%", "mcts-a"], "the statement reaches the database as it is"


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO tasks (name, config_hash, output_type, created_at) "
        "VALUES ('x', 'y', 'z', '2024-01-01')",
        "UPDATE runs SET status = 'failed'",
        "DELETE FROM evaluations",
        "DROP TABLE evaluations",
    ],
)
def test_sql_command_refuses_writes(url: str, statement: str, capsys) -> None:
    before = frames.tables(url)
    status, out, err = cola(capsys, "db", "sql", "--store", url, statement)
    assert status == 1 and not out
    assert re.fullmatch(r"cola db sql: error: .* is opened read-only for SQL: .*\n", err)
    after = frames.tables(url)
    for name, table in before.items():
        pd.testing.assert_frame_equal(after[name], table)


# -- cola db export ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trip(path: str, fmt: str, capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "dump"
    status, out, _ = cola(
        capsys, "db", "export", "--store", path, "--format", fmt, "--output_dir", str(out_dir)
    )
    assert status == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{name}.{fmt}" for name in queries.TABLES
    )
    assert f"evaluations: 19 rows -> {out_dir / f'evaluations.{fmt}'}" in out.splitlines()
    for name, table in frames.tables(path).items():
        file = out_dir / f"{name}.{fmt}"
        if fmt == "parquet":
            read = pd.read_parquet(file)
        else:  # read text as text ("1.0" is a version) and dates as dates, as a user would
            text = {c: str for c in table.columns if pd.api.types.is_string_dtype(table[c])}
            dates = [c for c in table.columns if c.endswith("_at")]
            read = pd.read_csv(file, dtype=text, parse_dates=dates)
        pd.testing.assert_frame_equal(as_values(read), as_values(table))


def as_values(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s values, whatever the dtypes, with every missing value as None: a CSV file
    cannot tell None from NaN, nor a column of strings from one of objects."""
    return frame.astype(object).where(frame.notna(), None)


def test_archive_restores_to_an_identical_store_that_a_search_resumes(
    path: str, capsys, tmp_path: Path
) -> None:
    """archive -> restore gives back every table row for row; the restored store takes new
    writes; a restore refuses to replace a store, and non-stores are refused both ways."""
    archive = tmp_path / "results" / "cola.db.gz"
    status, out, _ = cola(capsys, "db", "archive", "--store", path, "--output", str(archive))
    assert status == 0 and archive.is_file() and "MiB" in out
    restored = str(tmp_path / "again" / "cola.db")
    assert cola(capsys, "db", "restore", "--archive", str(archive), "--store", restored)[0] == 0
    for name, table in frames.tables(path).items():
        pd.testing.assert_frame_equal(frames.tables(restored)[name], table, obj=name)
    with Store(restored) as store:  # a search goes on writing into it
        store.finish_run(3)
    status, _, err = cola(capsys, "db", "restore", "--archive", str(archive), "--store", restored)
    assert status == 1 and "exists" in err and "never overwrites" in err
    (tmp_path / "notes.txt").write_text("not a store")
    status, _, err = cola(
        capsys, "db", "archive", "--store", str(tmp_path / "notes.txt"), "--output", "x.gz"
    )
    assert status == 1 and "notes.txt" in err
    status, _, err = cola(
        capsys, "db", "restore", "--archive", str(tmp_path / "notes.txt"), "--store",
        str(tmp_path / "new.db"),
    )  # fmt: skip
    assert status == 1 and "not a gzipped store" in err
    assert not (tmp_path / "new.db").exists()


def test_archives_are_reproducible_smaller_and_read_the_earlier_format(
    path: str, capsys, tmp_path: Path
) -> None:
    """The same store archives to the same bytes (git stores no churn), as SQL text smaller than
    the gzipped database file earlier releases wrote; those archives still restore."""
    first, second = tmp_path / "first.db.gz", tmp_path / "second.db.gz"
    for archive in (first, second):
        assert cola(capsys, "db", "archive", "--store", path, "--output", str(archive))[0] == 0
    assert first.read_bytes() == second.read_bytes()
    with gzip.open(first, "rt", encoding="utf-8") as text:
        assert text.readline() == "BEGIN TRANSACTION;\n"

    copy = tmp_path / "copy.db"
    with sqlite3.connect(path) as reader, sqlite3.connect(copy) as writer:
        reader.backup(writer)
    earlier = tmp_path / "earlier.db.gz"
    earlier.write_bytes(gzip.compress(copy.read_bytes()))
    assert first.stat().st_size < earlier.stat().st_size
    restored = str(tmp_path / "restored.db")
    assert cola(capsys, "db", "restore", "--archive", str(earlier), "--store", restored)[0] == 0
    for name, table in frames.tables(path).items():
        pd.testing.assert_frame_equal(frames.tables(restored)[name], table, obj=name)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("ATTACH DATABASE '{elsewhere}' AS other; CREATE TABLE other.t (x);", "not authorized"),
        ("CREATE TABLE notes (line TEXT);", "odd.db.gz does not hold a chain store: it is not"),
    ],
)
def test_a_restore_runs_only_a_stores_sql_into_the_new_file(
    script: str, message: str, capsys, tmp_path: Path
) -> None:
    """An archive's SQL cannot reach another file, and SQL that builds no chain store is refused;
    either way nothing appears under the requested path."""
    elsewhere = tmp_path / "elsewhere.db"
    archive = tmp_path / "odd.db.gz"
    archive.write_bytes(gzip.compress(script.format(elsewhere=elsewhere).encode()))
    target = tmp_path / "new.db"
    argv = ["db", "restore", "--archive", str(archive), "--store", str(target)]
    status, _, err = cola(capsys, *argv)
    assert status == 1 and message in err, err
    assert not target.exists() and not elsewhere.exists()


def test_a_restore_refuses_the_journal_a_deleted_store_left(
    path: str, capsys, tmp_path: Path
) -> None:
    """A store's file deleted while its write-ahead log still held pages (a killed search):
    SQLite would replay that log into a store restored under the same name."""
    archive = tmp_path / "cola.db.gz"
    assert cola(capsys, "db", "archive", "--store", path, "--output", str(archive))[0] == 0
    target = tmp_path / "cola.db"
    assert cola(capsys, "db", "restore", "--archive", str(archive), "--store", str(target))[0] == 0
    wal = Path(f"{target}-wal")
    writer = sqlite3.connect(target)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE notes (line TEXT)")
    writer.commit()
    pages = wal.read_bytes()
    writer.close()
    target.unlink()
    wal.write_bytes(pages)

    status, _, err = cola(
        capsys, "db", "restore", "--archive", str(archive), "--store", str(target)
    )
    assert status == 1 and f"{wal} is left from a removed store" in err and "delete" in err
    assert not target.exists() and wal.read_bytes() == pages
    wal.unlink()
    assert cola(capsys, "db", "restore", "--archive", str(archive), "--store", str(target))[0] == 0
    for name, table in frames.tables(path).items():
        pd.testing.assert_frame_equal(frames.tables(str(target))[name], table, obj=name)


def test_export_of_some_tables_and_of_an_unknown_one(path: str, capsys, tmp_path: Path) -> None:
    argv = ["db", "export", "--store", path, "--output_dir", str(tmp_path / "some")]
    assert cola(capsys, *argv, "--tables", "runs", "models")[0] == 0
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["models.csv", "runs.csv"]
    argv = ["db", "export", "--store", path, "--output_dir", str(tmp_path / "none")]
    status, _, err = cola(capsys, *argv, "--tables", "runs", "secrets")
    assert status == 1 and "has no table secrets" in err
    assert not (tmp_path / "none").exists(), "nothing is written when a table is unknown"


# -- cola db upgrade --------------------------------------------------------------------------


def test_upgrade_command(tmp_path: Path, capsys, monkeypatch, request) -> None:
    path = str(tmp_path / "cola.db")
    fill(path)
    status, out, _ = cola(capsys, "db", "upgrade", "--store", path)
    assert status == 0 and out == f"store sqlite:///{path} is current (schema 0003)\n"
    monkeypatch.setattr(engines, "MIGRATIONS", request.getfixturevalue("next_release"))
    status, _, err = cola(capsys, "db", "runs", "--store", path)
    assert status == 1 and f"upgrade it with cola db upgrade --store {path}" in err
    status, out, _ = cola(capsys, "db", "upgrade", "--store", path)
    assert status == 0 and out == f"store sqlite:///{path} upgraded: schema 0003 -> 0099\n"
    assert frames.stats(path, 1).iloc[0]["oracle_accuracy"] == pytest.approx(5 / 6)


# -- errors -----------------------------------------------------------------------------------

COMMANDS = [
    ["runs"],
    ["chains", "--run", "1"],
    ["stats", "--run", "1"],
    ["sql", "SELECT 1"],
    ["export", "--output_dir", "dump"],
    ["upgrade"],
]


def one_line_error(err: str, command: str) -> str:
    """The message of a ``cola db COMMAND`` error, checked to be a single line."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    prefix = f"cola db {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) :]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_missing_store_is_an_error_and_is_not_created(argv, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.db"
    status, out, err = cola(capsys, "db", argv[0], "--store", str(missing), *argv[1:])
    assert status == 1 and not out
    assert "does not exist" in one_line_error(err, argv[0])
    assert not missing.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_corrupt_store_is_an_error(argv, tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "cola.db"
    corrupt.write_bytes(os.urandom(8192))
    status, _, err = cola(capsys, "db", argv[0], "--store", str(corrupt), *argv[1:])
    assert status == 1
    assert "is not a readable lm-eval-cola store" in one_line_error(err, argv[0])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--run", "99"], "has no run '99'"),
        (["chains", "--run", "grid", "--run", "nope"], "has no run 'nope'"),
        (["runs", "--store", "nosuchdb://host/x"], "Can't load plugin: sqlalchemy.dialects"),
    ],
)
def test_bad_arguments_are_one_line_errors(path: str, argv, message: str, capsys) -> None:
    status, out, err = cola(capsys, "db", argv[0], "--store", path, *argv[1:])
    assert status == 1 and not out
    assert message in one_line_error(err, argv[0])


def test_cola_db_help_lists_the_commands() -> None:
    done = subprocess.run(
        [Path(sys.executable).parent / "cola", "db", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for command in ("runs", "chains", "stats", "sql", "export", "upgrade"):
        assert re.search(rf"^    {command} +\S", done.stdout, re.MULTILINE), command
    assert "cola db stats --store cola.db --run 3" in done.stdout
