"""lm-eval's task index served from this package's cache: the same index, rebuilt when stale."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm_eval_cola import task_cache


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_COLA_HOME", str(tmp_path / "home"))


def task_yaml(folder: Path, name: str, text: str = "q") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"task: {name}\ndataset_path: local\noutput_type: generate_until\n"
        f"doc_to_text: '{text}'\ndoc_to_target: a\n"
    )
    return path


class CountingBuild:
    """lm-eval's parse of one folder, counting how often it runs."""

    def __init__(self) -> None:
        from lm_eval.tasks._index import TaskIndex

        self.parse, self.calls = TaskIndex.build, 0

    def __call__(self, root: Path) -> dict:
        self.calls += 1
        return self.parse([root])


def test_lm_evals_own_index_reads_back_equal_to_its_parse():
    from lm_eval.tasks import _index

    build, root = CountingBuild(), Path(_index.__file__).parent
    parsed = task_cache.cached_index(root, build)
    stored = task_cache.cached_index(root, build)
    assert build.calls == 1
    assert stored == parsed and len(stored) > 10_000
    assert stored["arc_easy"].yaml_path == parsed["arc_easy"].yaml_path


def test_an_edited_added_or_removed_task_file_rebuilds_the_index(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    edited = task_yaml(folder, "one")
    build = CountingBuild()
    assert set(task_cache.cached_index(folder, build)) == {"one"}
    assert set(task_cache.cached_index(folder, build)) == {"one"} and build.calls == 1

    task_yaml(folder, "one", text="a longer question")
    index = task_cache.cached_index(folder, build)
    assert build.calls == 2 and index["one"].cfg["doc_to_text"] == "a longer question"

    stamp = edited.stat().st_mtime_ns + 10**9  # same size, new time: an edit all the same
    os.utime(edited, ns=(stamp, stamp))
    task_cache.cached_index(folder, build)
    assert build.calls == 3

    task_yaml(folder, "two")
    assert set(task_cache.cached_index(folder, build)) == {"one", "two"}
    edited.unlink()
    assert set(task_cache.cached_index(folder, build)) == {"two"} and build.calls == 5


def test_an_edited_template_that_task_files_include_rebuilds_the_index(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    template = folder / "_default_template_yaml"
    template.write_text("dataset_path: local\noutput_type: generate_until\ndoc_to_target: a\n")
    (folder / "one.yaml").write_text("include: _default_template_yaml\ntask: one\n")
    build = CountingBuild()
    assert task_cache.cached_index(folder, build)["one"].cfg["output_type"] == "generate_until"
    template.write_text("dataset_path: local\noutput_type: multiple_choice\ndoc_to_target: a\n")
    assert task_cache.cached_index(folder, build)["one"].cfg["output_type"] == "multiple_choice"
    assert build.calls == 2


def test_a_truncated_cache_file_is_rebuilt_and_replaced(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    task_yaml(folder, "one")
    build = CountingBuild()
    task_cache.cached_index(folder, build)
    path = task_cache.cache_file(folder)
    path.write_bytes(path.read_bytes()[:20])
    assert set(task_cache.cached_index(folder, build)) == {"one"} and build.calls == 2
    assert set(task_cache.cached_index(folder, build)) == {"one"} and build.calls == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_task_manager_with_the_cache_keeps_lm_evals_override_order(tmp_path):
    """lm-eval's tasks from the cache, then this package's, then the user's: later ones win."""
    from lm_eval.tasks import TaskManager

    from lm_eval_cola._hook import register_now

    register_now()
    mine = tmp_path / "mine"
    mine.mkdir()
    task_yaml(mine, "arc_easy")
    for _ in range(2):  # built, then from the cache
        manager = TaskManager(include_path=str(mine))
        assert Path(manager.task_index["arc_easy"].yaml_path) == mine / "arc_easy.yaml"
        assert manager.task_index["arc_challenge"].yaml_path.parts[-2] == "arc"
        assert "arc_easy_gen" in manager.all_subtasks
    assert task_cache.cache_file(
        Path(manager.task_index["arc_challenge"].yaml_path).parents[1]
    ).is_file()
