"""Searching in worker processes (``--workers``): the same store as one process, the work
counted, failures reported without losing what finished, and refused where it cannot run."""

from __future__ import annotations

import optuna
import pytest

from lm_eval_cola.search.runner import SearchRun
from lm_eval_cola.search.workers import check_workers
from lm_eval_cola.store.store import Store
from tests.test_search import TASKS, scored, search


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    from lm_eval_cola.lm import ColaLM

    return ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)


@pytest.mark.parametrize("name", TASKS)
def test_workers_store_what_one_process_stores(lm, task_dir, tmp_path, name):
    """Two workers, each with documents in parallel: the rows one process writes, and the
    workers' compute added to this process's count."""
    one = search(lm, task_dir, tmp_path / "one.db", name=name, budget=12)
    before = lm.executor.work
    how = {"parallel_docs": 2, "prefix_cache_mb": 64, "workers": 2}
    workers = search(lm, task_dir, tmp_path / "workers.db", name=name, budget=12, how=how)
    spent = lm.executor.work - before
    expected, found = scored(tmp_path / "one.db", one), scored(tmp_path / "workers.db", workers)
    assert len(expected) > 12
    assert [row[:4] for row in found] == [row[:4] for row in expected]
    assert [row[4] for row in found] == pytest.approx([row[4] for row in expected], abs=1e-5)
    assert spent.token_layer_applications > 0 and spent.forward_calls > 0


def test_a_failing_worker_stops_the_run_and_the_run_resumes(lm, task_dir, tmp_path, monkeypatch):
    """A worker that fails names itself and its error; the documents stored stay, and the same
    run started again finishes with the rows of an uninterrupted one."""
    path, how = tmp_path / "cola.db", {"workers": 2, "run_name": "gen"}
    searcher = SearchRun._searcher

    def failing(run, document):
        if document.doc_id == 1:
            raise RuntimeError("no such chain")
        return searcher(run, document)

    monkeypatch.setattr(SearchRun, "_searcher", failing)
    with pytest.raises(RuntimeError, match=r"search worker 1 failed:(.|\n)*no such chain"):
        search(lm, task_dir, path, name="cola_gen", budget=6, how=how)
    monkeypatch.setattr(SearchRun, "_searcher", searcher)
    resumed = search(lm, task_dir, path, name="cola_gen", budget=6, how=how)
    whole = search(lm, task_dir, tmp_path / "whole.db", name="cola_gen", budget=6)
    assert scored(path, resumed) == scored(tmp_path / "whole.db", whole)


@pytest.mark.parametrize(
    ("workers", "device", "problem"),
    [(0, "cpu", "at least 1 process"), (2, "cuda", "on a GPU search in one process")],
)
def test_workers_are_refused_where_they_cannot_run(workers, device, problem):
    with pytest.raises(ValueError, match=problem):
        check_workers(workers, device)


def test_workers_archive_every_document_s_optuna_study(lm, task_dir, tmp_path):
    """An Optuna method's studies reach the store's database from the workers too."""
    path = tmp_path / "cola.db"
    search(lm, task_dir, path, method="tpe", budget=6, limit=3, how={"workers": 2})
    url = Store(str(path), read_only=True).url_for_studies()
    names = optuna.get_all_study_names(storage=url)
    assert len(names) == 3 and all(name.startswith("cola_mc-tpe-") for name in names)
    for name in names:
        assert len(optuna.load_study(study_name=name, storage=url).trials) >= 6
