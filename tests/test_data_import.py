"""``cola data import``: a small ARC-style data set goes into a temporary datasets cache and must
load back offline, through ``datasets.load_dataset`` in a fresh interpreter, row for row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_cola import cli
from lm_eval_cola.data_import import (
    DataImportError,
    DatasetRef,
    dataset_of,
    find_splits,
    import_dataset,
    task_dataset,
    verify,
)

REF = DatasetRef("someorg/ToyArc", "ARC-Toy")  # CamelCase: datasets snake-cases the folder


def arc_rows(split: str, n: int = 3) -> list[dict]:
    return [
        {
            "id": f"{split}_{i}",
            "question": f"Which one is {split} number {i}? (ünïcode)",
            "choices": {"text": ["a", "b", "c", "d"][: 3 + i % 2], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABC"[i % 3],
        }
        for i in range(n)
    ]


def write_splits(data_dir: Path, rows: dict[str, list[dict]]) -> dict[str, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
        (data_dir / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return find_splits(data_dir)


@pytest.fixture
def arc_data(tmp_path) -> dict[str, list[dict]]:
    rows = {split: arc_rows(split) for split in ("train", "validation", "test")}
    write_splits(tmp_path / "data", rows)
    return rows


def load_offline(ref: DatasetRef, cache_dir: Path) -> dict[str, list[dict]]:
    """What ``load_dataset`` returns in a new interpreter with the hub switched off."""
    code = (
        "import json, sys, datasets\n"
        "ds = datasets.load_dataset(sys.argv[1], sys.argv[2] or None)\n"
        "print(json.dumps({split: list(ds[split]) for split in ds}))\n"
    )
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache_dir),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [sys.executable, "-c", code, ref.path, ref.name or ""]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_import_loads_back_offline_row_for_row(tmp_path, arc_data):
    cache = tmp_path / "cache"
    where = import_dataset(REF, find_splits(tmp_path / "data"), cache)
    assert where.parent.parent == cache / "someorg___toy_arc" / "ARC-Toy"
    assert sorted(p.name for p in where.glob("*.arrow")) == [
        "toy_arc-test.arrow",
        "toy_arc-train.arrow",
        "toy_arc-validation.arrow",
    ]
    assert load_offline(REF, cache) == arc_data
    assert not list(cache.rglob(".cola-import-*")), "temporary folders must be gone"


def test_verify_reports_each_split(tmp_path, arc_data):
    splits, cache = find_splits(tmp_path / "data"), tmp_path / "cache"
    import_dataset(REF, splits, cache)
    lines = verify(REF, splits, cache)
    assert [line.split(":")[1].split()[1] for line in lines] == ["test", "train", "validation"]
    assert all("3 rows" in line and "identical" in line for line in lines)


def test_verify_catches_rows_that_differ(tmp_path, arc_data):
    splits, cache = find_splits(tmp_path / "data"), tmp_path / "cache"
    import_dataset(REF, splits, cache)
    write_splits(tmp_path / "data", {"test": list(reversed(arc_data["test"]))})
    with pytest.raises(DataImportError, match=r"test: 3 rows.*MISMATCH"):
        verify(REF, splits, cache)


def test_reimport_replaces_the_previous_import(tmp_path, arc_data):
    cache = tmp_path / "cache"
    import_dataset(REF, find_splits(tmp_path / "data"), cache)
    new_rows = {"train": arc_rows("train", 5), "test": arc_rows("test", 1)}
    splits = write_splits(tmp_path / "new", new_rows)
    where = import_dataset(REF, splits, cache)
    assert list((cache / "someorg___toy_arc" / "ARC-Toy").glob("*/*")) == [where]
    assert load_offline(REF, cache) == new_rows
    assert len(verify(REF, splits, cache)) == 2


def test_unnamed_config_is_the_default_config(tmp_path, arc_data):
    ref, cache = DatasetRef("someorg/plain", None), tmp_path / "cache"
    where = import_dataset(ref, find_splits(tmp_path / "data"), cache)
    assert where.parent.parent.name == "default"
    assert load_offline(ref, cache) == arc_data


def test_missing_data_dir_says_what_to_pass(tmp_path):
    with pytest.raises(DataImportError, match="does not exist: pass --data_dir"):
        find_splits(tmp_path / "nowhere")


def test_data_dir_without_jsonl_says_what_to_put_there(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(DataImportError, match=r"No \*.jsonl file .*train.jsonl"):
        find_splits(tmp_path)


def test_malformed_jsonl_is_a_clear_error(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(DataImportError, match=r"test\.jsonl.*one JSON object"):
        import_dataset(REF, find_splits(tmp_path), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.arrow"))


@pytest.mark.parametrize(
    ("task", "ref"),
    [
        ("arc_easy", DatasetRef("allenai/ai2_arc", "ARC-Easy")),
        ("arc_challenge", DatasetRef("allenai/ai2_arc", "ARC-Challenge")),
        ("gsm8k", DatasetRef("openai/gsm8k", "main")),
    ],
)
def test_task_dataset_comes_from_lm_evals_own_configs(task, ref):
    assert task_dataset(task) == ref


def test_unknown_task_lists_close_matches():
    with pytest.raises(DataImportError, match=r"Unknown lm-eval task 'arc_easyy'.*arc_easy"):
        task_dataset("arc_easyy")


def test_tag_is_not_a_task():
    with pytest.raises(DataImportError, match=r"'ai2_arc' is a tag .*arc_easy.*not a task"):
        task_dataset("ai2_arc")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"dataset_path": "json", "dataset_kwargs": {"data_files": "x"}}, "not load a hub"),
        ({"dataset_path": "org/set", "dataset_kwargs": {"data_dir": "x"}}, "data_dir"),
        ({}, "path=None"),
        ({"dataset_path": "a/b/c"}, "not load a hub"),
    ],
)
def test_tasks_this_import_cannot_stand_in_for(cfg, message):
    with pytest.raises(DataImportError, match=message):
        dataset_of("t", cfg)


def test_trust_remote_code_is_ignored_as_lm_eval_does():
    kwargs = {"trust_remote_code": True}
    cfg = {"dataset_path": "org/set", "dataset_name": "c", "dataset_kwargs": kwargs}
    assert dataset_of("t", cfg) == DatasetRef("org/set", "c")


def test_cli_imports_a_task_from_include_path(tmp_path, arc_data, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: cola_toy_arc\ndataset_path: someorg/ToyArc\ndataset_name: ARC-Toy\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: 0\ndoc_to_choice: "{{choices.text}}"\n'
    )
    argv = ["data", "import", "--tasks", "cola_toy_arc", "--data_dir", str(tmp_path / "data")]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--include_path", str(tasks)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("identical offline") == 3
    assert "HF_DATASETS_CACHE=" in out
    assert load_offline(REF, tmp_path / "cache") == arc_data


def test_cli_error_exits_1_with_the_fix(tmp_path, capsys):
    argv = ["data", "import", "--tasks", "arc_easy", "--data_dir", str(tmp_path / "nowhere")]
    assert cli.main(argv) == 1
    assert "--data_dir" in capsys.readouterr().err


def test_cli_takes_one_task_per_call(tmp_path, arc_data, capsys):
    argv = ["data", "import", "--tasks", "arc_easy,gsm8k", "--data_dir", str(tmp_path / "data")]
    assert cli.main(argv) == 1
    assert "one task" in capsys.readouterr().err


SHARED = Path(
    os.environ.get("COLA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def test_arc_easy_ships_with_the_package_and_imports_without_files(tmp_path, capsys):
    """No --data_dir: the packaged, gzipped ARC-Easy becomes the stock task's offline data,
    all three splits, row for row."""
    argv = ["data", "import", "--tasks", "arc_easy", "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for split, rows in [("train", 2251), ("validation", 570), ("test", 2376)]:
        assert f"ARC-Easy {split}: {rows} rows" in out
    assert out.count("loads back identical offline") == 3


def test_the_packaged_copy_is_the_shared_data_set():
    """The packaged files hold exactly the rows of ../shared/data/arc_easy (hub schema)."""
    from lm_eval_cola.data_import import PACKAGED, jsonl_rows, rows_digest

    if not (SHARED / "arc_easy").is_dir():
        pytest.skip(f"no shared data at {SHARED} to compare the packaged ARC-Easy with")
    packaged = find_splits(PACKAGED[("allenai/ai2_arc", "ARC-Easy")])
    assert sorted(packaged) == ["test", "train", "validation"]
    for split, path in packaged.items():
        assert rows_digest(jsonl_rows(path)) == rows_digest(
            jsonl_rows(SHARED / "arc_easy" / f"{split}.jsonl")
        ), split


def test_a_task_without_packaged_data_needs_a_data_dir(capsys):
    assert cli.main(["data", "import", "--tasks", "gsm8k"]) == 1
    assert "pass --data_dir" in capsys.readouterr().err


def test_every_task_on_the_packaged_data_set_imports_it(tmp_path, capsys):
    """arc_easy_gen loads the same hub data set as arc_easy, so it needs no --data_dir either."""
    argv = ["data", "import", "--tasks", "arc_easy_gen", "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("loads back identical offline") == 3
