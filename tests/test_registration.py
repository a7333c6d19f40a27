"""``--model cola`` resolves in every way lm-eval is launched, and the built-ins still do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LAUNCHERS = {
    "lm_eval": ["lm_eval"],
    "lm_eval run": ["lm_eval", "run"],
    "python -m lm_eval": [sys.executable, "-m", "lm_eval"],
    "accelerate launch": ["accelerate", "launch", "--cpu", "--num_processes", "1", "-m", "lm_eval"],
    "cola lm_eval": ["cola", "lm_eval"],
    "python -m lm_eval_cola": [sys.executable, "-m", "lm_eval_cola", "lm_eval"],
}


def lm_eval_args(model: str, pretrained: str, task_dir: str) -> list[str]:
    return [
        "--model", model, "--model_args", f"pretrained={pretrained},dtype=float32",
        "--tasks", "cola_mc", "--include_path", task_dir, "--limit", "2", "--device", "cpu",
    ]  # fmt: skip


def test_every_launcher_finds_cola_and_hf(tiny_llama_dir, task_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = {
        (name, model): subprocess.Popen(
            [*launcher, *lm_eval_args(model, tiny_llama_dir, task_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for name, launcher in LAUNCHERS.items()
        for model in (["cola", "hf"] if name == "lm_eval" else ["cola"])
    }
    for (name, model), process in runs.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} --model {model} failed:\n{output[-3000:]}"
        assert f"{model} (" in output and "|cola_mc|" in output, output[-3000:]


@pytest.mark.parametrize("argv", [["--help"], ["data", "import", "--help"]])
def test_cli_help_has_examples(argv):
    done = subprocess.run(["cola", *argv], capture_output=True, text=True, check=True)
    assert "example" in done.stdout.lower()
