"""The real thing: SmolLM2-135M-Instruct on ARC-Easy, through the stock ``lm_eval`` CLI.

ARC-Easy comes from the copy that ships with the package, through ``cola data import`` into a
private datasets cache, exactly as an air-gapped user would do it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from lm_eval_cola.data_import import PACKAGED, jsonl_rows
from lm_eval_cola.default_model import DISPLAY_NAME

pytestmark = pytest.mark.integration

LIMIT = 20


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose datasets cache holds ARC-Easy, imported by ``cola data import``."""
    home = tmp_path_factory.mktemp("hf_home")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    subprocess.run(
        ["cola", "data", "import", "--tasks", "arc_easy"],
        env=env,
        check=True,
    )
    return env


@pytest.fixture(scope="module")
def default_model() -> str:
    from lm_eval_cola.default_model import default_model_path

    return default_model_path()


def lm_eval(
    env,
    out: Path,
    model: str,
    model_args: str,
    limit: int = LIMIT,
    batch_size: int = 8,
    task: str = "arc_easy",
) -> dict[int, dict]:
    """Run the stock CLI; return its logged samples by doc_id."""
    command = [
        "lm_eval", "--model", model, "--model_args", f"{model_args},dtype=float32",
        "--tasks", task, "--limit", str(limit), "--device", "cpu",
        "--batch_size", str(batch_size),
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    (samples,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {row["doc_id"]: row for row in rows}


def scores(samples: dict[int, dict]) -> dict[int, tuple]:
    """Per document: accuracy, normalised accuracy, and every choice's log-likelihood."""
    return {
        doc_id: (row["acc"], row["acc_norm"], [r[0][0] for r in row["resps"]])
        for doc_id, row in samples.items()
    }


@pytest.fixture(scope="module")
def hf_samples(offline_env, default_model, tmp_path_factory):
    return lm_eval(offline_env, tmp_path_factory.mktemp("hf"), "hf", f"pretrained={default_model}")


def test_data_import_gives_the_stock_task_the_local_documents(hf_samples):
    packaged = PACKAGED[("allenai/ai2_arc", "ARC-Easy")]
    rows = list(jsonl_rows(packaged / "test.jsonl.gz"))[:LIMIT]
    expected = [row["id"] for row in rows]
    assert [hf_samples[i]["doc"]["id"] for i in range(LIMIT)] == expected


@pytest.mark.internals
def test_cola_without_chain_equals_hf(offline_env, hf_samples, tmp_path):
    cola = lm_eval(offline_env, tmp_path, "cola", "")  # the embedded default model
    assert scores(cola) == scores(hf_samples)


@pytest.mark.internals
def test_a_chain_changes_the_results(offline_env, hf_samples, tmp_path):
    cola = lm_eval(offline_env, tmp_path, "cola", "chain=0-9.14-29")
    assert scores(cola) != scores(hf_samples)
    changed = sum(scores(cola)[i][2] != scores(hf_samples)[i][2] for i in range(LIMIT))
    assert changed == LIMIT


def test_per_document_chains_apply_to_their_own_document(
    offline_env, default_model, hf_samples, tmp_path
):
    """Batch size 1: grouping by chain changes which requests share a batch, and on CPU a
    different batch shape can move a log-likelihood in its 6th digit. One request a batch makes
    every run compute each request alone, so results must match exactly. Packed documents
    (``chains=``'s default) compute each shared context once: the same answers, and
    log-likelihoods within 1e-4."""
    plan = {3: "0-9.14-29", 7: "0-15.15-29", 8: "0-9.14-29"}
    rows = [
        {"task": "arc_easy", "doc_hash": hf_samples[i]["doc_hash"], "chain": c}
        for i, c in plan.items()
    ]
    chains = tmp_path / "chains.jsonl"
    chains.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(name: str, model: str, model_args: str) -> dict[int, tuple]:
        return scores(lm_eval(offline_env, tmp_path / name, model, model_args, 10, 1))

    mixed = run("mixed", "cola", f"chains={chains},shared_context=False")
    packed = run("packed", "cola", f"chains={chains}")
    uniform = {chain: run(chain, "cola", f"chain={chain}") for chain in set(plan.values())}
    baseline = run("hf", "hf", f"pretrained={default_model}")
    for doc_id, result in mixed.items():
        expected = uniform[plan[doc_id]] if doc_id in plan else baseline
        assert result == expected[doc_id], doc_id
        assert packed[doc_id][:2] == result[:2], doc_id
        logliks = [float(value) for value in packed[doc_id][2]]  # logged as text
        assert logliks == pytest.approx([float(value) for value in result[2]], abs=1e-4), doc_id


def test_gguf_file_loads_through_hflm(offline_env, tmp_path):
    """HFLM's ``gguf_file`` option: the package's GGUF file, dequantised at load, with a chain."""
    from lm_eval_cola.default_model import gguf_path

    gguf = gguf_path()
    args = f"pretrained={gguf.parent},gguf_file={gguf.name}"
    hf = scores(lm_eval(offline_env, tmp_path / "hf", "hf", args, limit=5))
    assert scores(lm_eval(offline_env, tmp_path / "cola", "cola", args, limit=5)) == hf
    chained = lm_eval(offline_env, tmp_path / "chain", "cola", f"{args},chain=0-9.14-29", limit=5)
    assert scores(chained) != hf


def test_search_on_smollm2_is_stored_and_reproduced_by_lm_eval(offline_env, tmp_path):
    """MCTS on 5 ARC-Easy documents: the store holds what the search printed, and re-evaluating
    with the store's chains through the stock CLI scores every document as recorded."""
    store = tmp_path / "cola.db"
    search = [
        "cola", "search", "--tasks", "arc_easy", "--limit", "5", "--method", "mcts",
        "--budget", "12", "--store", str(store), "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(search, env=offline_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = re.search(
        r"run (\d+) .*: searched 5 documents, (\d+) evaluations; originally correct with a "
        r"shorter correct chain: (\d+)/(\d+); originally wrong and corrected: (\d+)/(\d+)",
        done.stdout,
    )
    assert printed, done.stdout
    run_id, evaluations, shortened, right, corrected, wrong = map(int, printed.groups())

    def db(*command: str):
        query = ["cola", "db", *command, "--store", str(store), "--run", str(run_id)]
        out = subprocess.run(
            [*query, "--format", "json"], env=offline_env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    stats = db("stats")
    assert stats["documents"] == 5 and evaluations == 5 * 12
    runs = ["cola", "db", "runs", "--store", str(store), "--format", "json"]
    listed = subprocess.run(runs, env=offline_env, capture_output=True, text=True)
    assert [run["model"] for run in json.loads(listed.stdout)] == [DISPLAY_NAME]
    assert stats["original_accuracy"] == pytest.approx(right / 5)
    assert stats["shorter_correct_share"] == pytest.approx(shortened / right if right else None)
    assert stats["corrected_share"] == pytest.approx(corrected / wrong if wrong else None)
    chosen = db("chains")
    oracle = lm_eval(
        offline_env, tmp_path / "oracle", "cola", f"chains=store:{store};run={run_id}", 5, 1
    )
    by_hash = {row["doc_hash"]: row for row in chosen}
    for sample in oracle.values():
        assert sample["acc"] == by_hash[sample["doc_hash"]]["score"], sample["doc_id"]


@pytest.mark.internals
def test_generated_answers_equal_hf_and_searched_chains_reproduce(offline_env, tmp_path):
    """arc_easy_gen on SmolLM2: ``--model cola`` without a chain generates what ``hf``
    generates; a search (prefill reuse on) stores chains whose generated answers the stock
    CLI reproduces document by document."""
    from lm_eval_cola.default_model import default_model_path

    importing = ["cola", "data", "import", "--tasks", "arc_easy_gen"]
    subprocess.run(importing, env=offline_env, check=True)

    def generated(name: str, model: str, args: str, limit: int) -> dict[int, tuple]:
        samples = lm_eval(offline_env, tmp_path / name, model, args, limit, 1, "arc_easy_gen")
        return {i: (row["resps"], row["exact_match"]) for i, row in samples.items()}

    hf = generated("hf", "hf", f"pretrained={default_model_path()}", 5)
    assert generated("cola", "cola", "", 5) == hf
    store = tmp_path / "cola.db"
    search = [
        "cola", "search", "--tasks", "arc_easy_gen", "--limit", "3", "--budget", "12",
        "--parallel_docs", "3", "--store", str(store), "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(search, env=offline_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    query = ["cola", "db", "chains", "--store", str(store), "--run", "1", "--format", "json"]
    chosen = json.loads(subprocess.run(query, env=offline_env, capture_output=True).stdout)
    oracle = lm_eval(
        offline_env, tmp_path / "oracle", "cola", f"chains=store:{store};run=1", 3, 1,
        "arc_easy_gen",
    )  # fmt: skip
    by_hash = {row["doc_hash"]: row for row in chosen}
    for sample in oracle.values():
        assert sample["exact_match"] == by_hash[sample["doc_hash"]]["score"], sample["doc_id"]
