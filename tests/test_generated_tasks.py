"""The generated-answer tasks that ship with the package: found by lm-eval with no
``--include_path``, loaded offline, and scoring a known answer right and a wrong one wrong.

Each check runs in a fresh interpreter whose Hugging Face home holds only what
``cola data import`` put there, as on an air-gapped machine. ARC-Easy comes from the packaged
copy; ARC-Challenge and GSM8K from ``../shared/data`` (skipped, with the reason, without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SHARED = Path(
    os.environ.get("COLA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

#: task -> (data_dir for `cola data import`, None: packaged; right and wrong raw answers as
#: functions of the gold target)
CASES = {
    "arc_easy_gen": (None, lambda t: [f" {t}", f" {t}. because", f"({t})"], lambda t: [" E", ""]),
    "arc_challenge_gen": (SHARED / "arc_challenge", lambda t: [f" {t}"], lambda t: [" E"]),
    "gsm8k_direct": (SHARED / "gsm8k", lambda t: [f" {t}", f" ${t}."], lambda t: [f" {t}1"]),
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lm_eval_cola.tasks import load_tasks, task_documents

    name, answers = sys.argv[1], json.loads(sys.argv[2])
    task = load_tasks(name)[name]
    (document,) = task_documents(task, limit=1)
    target = str(task.doc_to_target(document.doc))
    scores = {}
    for kind in ("right", "wrong"):
        scores[kind] = []
        for answer in answers[kind]:
            answer = answer.replace("{t}", target)
            for instance in document.instances:
                instance.resps, instance.filtered_resps = [answer], {}
            for ensemble in task._filters:
                ensemble.apply(document.instances)
            name_ = task._filters[0].name
            results = [i.filtered_resps[name_] for i in document.instances]
            scores[kind].append(task.process_results(document.doc, results)["exact_match"])
    print(json.dumps({"target": target, "scores": scores,
                      "max_gen_toks": task.config.generation_kwargs["max_gen_toks"]}))
    """
)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


def offline(hf_home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    env.pop("HF_DATASETS_CACHE", None)
    return env


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_loads_offline_and_scores_a_known_answer(name, hf_home):
    data_dir, right, wrong = CASES[name]
    if data_dir is not None and not data_dir.is_dir():
        pytest.skip(f"no shared data at {data_dir}: {name}'s data set does not ship")
    env = offline(hf_home)
    command = ["cola", "data", "import", "--tasks", name]
    command += ["--data_dir", str(data_dir)] if data_dir is not None else []
    subprocess.run(command, env=env, check=True, capture_output=True)
    # "{t}" stands for the gold target, which only the task itself can tell
    answers = {"right": right("{t}"), "wrong": wrong("{t}")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, name, json.dumps(answers)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["scores"]["right"] == [1.0] * len(answers["right"]), found
    assert found["scores"]["wrong"] == [0.0] * len(answers["wrong"]), found
    assert found["max_gen_toks"] == (32 if name == "gsm8k_direct" else 5)


def test_the_tasks_are_in_lm_evals_index_without_include_path():
    from lm_eval.tasks import TaskManager

    from lm_eval_cola._hook import register_now

    register_now()
    manager = TaskManager()
    assert {"arc_easy_gen", "arc_challenge_gen", "gsm8k_direct"} <= set(manager.all_subtasks)
    assert "cola_generated" in manager.all_tags


def test_a_users_include_path_still_wins(tmp_path):
    """A task of the same name in the user's --include_path replaces ours (later paths win)."""
    from lm_eval.tasks import TaskManager

    from lm_eval_cola._hook import register_now

    register_now()
    (tmp_path / "mine.yaml").write_text(
        "task: arc_easy_gen\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answerKey}}'\n"
    )
    manager = TaskManager(include_path=str(tmp_path))
    assert Path(manager.task_index["arc_easy_gen"].yaml_path) == tmp_path / "mine.yaml"
