"""The benchmark scripts' checks have teeth: a wrong result makes them exit non-zero."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lm_eval_cola.lm import ColaLM

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_fails_when_cola_results_differ(tiny_llama_dir, task_dir, monkeypatch):
    overhead = script("overhead")
    args = ["--pretrained", tiny_llama_dir, "--task", "cola_mc", "--include_path", task_dir,
            "--limit", "4", "--batch_size", "3", "--repeats", "1"]  # fmt: skip
    assert overhead.main(args) == 0
    exact = ColaLM.loglikelihood

    def off_by_a_little(self, requests, disable_tqdm=False):
        return [(loglik + 1e-3, greedy) for loglik, greedy in exact(self, requests, disable_tqdm)]

    monkeypatch.setattr(ColaLM, "loglikelihood", off_by_a_little)
    assert overhead.main(args) == 1
