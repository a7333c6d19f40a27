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


def test_predictor_report_has_a_learning_curve_and_out_of_domain_tables(
    tiny_llama_dir, task_dir, tmp_path
):
    """benchmarks/predictors.py on a tiny search: one table per training size on the held-out
    test split, and the out-of-domain task at the largest size, every predictor a row."""
    from lm_eval_cola.search.runner import SearchRun, SearchSettings
    from lm_eval_cola.store.store import Store
    from lm_eval_cola.tasks import load_tasks

    lm = ColaLM(pretrained=tiny_llama_dir, device="cpu", batch_size=1)
    train = load_tasks("cola_split", task_dir, split="train")["cola_split"]
    with Store(str(tmp_path / "train.db")) as store:
        run_id = SearchRun(lm, train, store, SearchSettings(method="mcts", budget=12)).run()
    report = tmp_path / "PREDICTORS.md"
    args = ["--store", str(tmp_path / "train.db"), "--run", str(run_id),
            "--model_args", f"pretrained={tiny_llama_dir}", "--device", "cpu",
            "--include_path", task_dir, "--sizes", "7,14", "--kinds", "static,knn,router,router-ce",
            "--candidates", "6", "--ood_tasks", "cola_mc", "--report", str(report)]  # fmt: skip
    assert script("predictors").main(args) == 0
    text = report.read_text()
    assert "Trained on 7 documents, judged on 8 cola_split documents (in domain" in text
    assert "Trained on 14 documents, judged on 8 cola_split documents (in domain" in text
    assert (
        "Trained on 14 documents, judged on" in text and "cola_mc documents (out of domain" in text
    )
    assert text.count("| knn |") == 3 and text.count("| static |") == 3
    assert text.count("| router |") == text.count("| router-ce |") == 3
    assert "| documents with a correct chain |" in text and "Router targets" in text
