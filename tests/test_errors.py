"""Errors a user can cause on the command line: one line on stderr naming the problem and the
fix, a non-zero exit, no traceback, raised before the model loads where it can be, and no
store file left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_cola.errors import ColaError, one_line
from lm_eval_cola.model_args import COLA_ARGS, ModelArgsError, check_names, preflight

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LM_EVAL = [sys.executable, "-c", "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"]


def only_line(stderr: str, prog: str) -> str:
    """The one line a failed command printed; fails on anything else (a traceback, noise)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr[-3000:]
    return lines[0]


def bad_model_args(tiny: str, tmp: Path) -> list[tuple[str, str]]:
    """(model args, what the message must say), one per mistake."""
    return [
        (f"pretrained={tiny},chain=0-9", "out of range: the model has 4 layers"),
        (f"pretrained={tiny},chain=0-2.x", "write layers as '.'-separated tokens"),
        (f"pretrained={tiny},chain=3.10", "quote it in --model_args (chain='3.10')"),
        (f"pretrained={tiny},chains=store:{tmp / 'missing.db'}", "missing.db' does not exist"),
        (f"pretrained={tiny},chains={tmp / 'missing.jsonl'}", "missing.jsonl' does not exist"),
        (f"pretrained={tiny},chian=0-3", "did you mean 'chain'?"),
        (f"pretrained={tiny},chain=0-3,strict_chain=True", "did you mean 'strict_chains'?"),
        (f"pretrained={tiny},max_chain_lenght=9", "did you mean 'max_chain_length'?"),
        (f"pretrained={tiny},shared_contex=False", "did you mean 'shared_context'?"),
        (f"pretrained={tmp / 'no_model'},chain=0-3", "no such folder"),
        (f"pretrained={tiny},chains=predictor:{tmp / 'knn.pt'}", "knn.pt' does not exist"),
        (f"pretrained={tiny},chains=store:{tmp / 'x.db'};pick=worst", "pick=worst: choose"),
        (f"pretrained={tiny},chains=nonsense", "unknown chain source 'nonsense'"),
    ]


@pytest.mark.parametrize("index", range(13))
def test_lm_eval_prints_one_line_before_it_indexes_tasks(index, tiny_llama_dir, tmp_path):
    model_args, message = bad_model_args(tiny_llama_dir, tmp_path)[index]
    # a task that does not exist: the error must come before lm-eval looks for tasks
    command = [*LM_EVAL, "--model", "cola", "--model_args", model_args, "--tasks", "no_such_task"]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert message in only_line(done.stderr, "lm_eval")


def test_an_error_found_while_running_is_one_line_too(tiny_llama_dir, task_dir, tmp_path):
    """strict_chains with a document the source lacks is only known once requests exist."""
    chains = tmp_path / "chains.jsonl"
    chains.write_text(json.dumps({"task": "cola_mc", "doc_hash": "0" * 64, "chain": "0-3"}) + "\n")
    model_args = f"pretrained={tiny_llama_dir},chains={chains},strict_chains=True"
    command = [
        *LM_EVAL, "--model", "cola", "--model_args", model_args, "--tasks", "cola_mc",
        "--include_path", task_dir, "--device", "cpu",
    ]  # fmt: skip
    env = {**ENV, "LMEVAL_LOG_LEVEL": "ERROR"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lm_eval: error:")]
    assert len(errors) == 1 and "drop strict_chains" in errors[0], done.stderr[-3000:]


@pytest.mark.parametrize("index", [0, 3, 5])
def test_cola_search_fails_in_one_line_and_leaves_no_store(index, tiny_llama_dir, tmp_path):
    model_args, message = bad_model_args(tiny_llama_dir, tmp_path)[index]
    store = tmp_path / "new.db"
    command = [
        sys.executable, "-m", "lm_eval_cola", "search", "--model_args", model_args,
        "--tasks", "no_such_task", "--store", str(store),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert message in only_line(done.stderr, "cola search")
    assert not list(tmp_path.glob("new.db*"))


def test_a_model_that_fails_to_load_leaves_no_store(tiny_llama_dir, task_dir, tmp_path):
    """Past every check that needs no weights: the weights themselves are missing."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_llama_dir):
        if not name.endswith(".safetensors"):
            (broken / name).write_bytes((Path(tiny_llama_dir) / name).read_bytes())
    command = [
        sys.executable, "-m", "lm_eval_cola", "search", "--model_args", f"pretrained={broken}",
        "--tasks", "cola_mc", "--include_path", task_dir, "--device", "cpu",
        "--store", str(tmp_path / "new.db"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "the model cannot be loaded" in done.stderr.splitlines()[-1]
    assert not list(tmp_path.glob("new.db*"))


def test_near_misses_get_a_suggestion_and_other_names_pass_to_the_model():
    for name in COLA_ARGS:
        with pytest.raises(ModelArgsError, match=f"did you mean '{name}'"):
            check_names({name[:-1] + "z" + name[-1]: 1})
    check_names({name: 1 for name in COLA_ARGS})
    check_names({"pretrained": "x", "attn_implementation": "eager", "low_cpu_mem_usage": True})


def test_preflight_reads_the_depth_from_the_config_alone(tiny_llama_dir):
    preflight({"pretrained": tiny_llama_dir, "chain": "0-3.3"})
    with pytest.raises(ColaError, match="out of range"):
        preflight({"pretrained": tiny_llama_dir, "chain": "0-4"})


def test_a_message_of_several_lines_prints_as_one():
    assert one_line(ColaError("first\n  second\n\nthird")) == "first; second; third"
