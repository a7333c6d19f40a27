"""Oracle re-evaluation: chains picked from the store reproduce the scores recorded for them.

A small grid "search" evaluates a few chains on every document of a local multiple-choice task
through lm-eval itself and records each document's metrics in a store; ``chains=store:...``
must then make ``--model cola`` score every document exactly as recorded for its picked chain.
"""

from __future__ import annotations

import logging

import lm_eval
import pytest

from lm_eval_cola.chain import Chain
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.sources import ChainSourceError
from lm_eval_cola.store import queries
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo
from lm_eval_cola.tasks import task_index

GRID = ["0-3", "0.1.1.3", "3.2.1.0", "1-3", "0.2x2.3"]
TASK = "cola_mc"


def per_document(lm, task_dir: str) -> dict[str, dict]:
    """{doc_hash: sample} for one evaluation of the local multiple-choice task."""
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=task_index(task_dir), log_samples=True
    )
    return {s["doc_hash"]: s for s in out["samples"][TASK]}


@pytest.fixture(scope="module")
def searched(tiny_llama_dir, task_dir, tmp_path_factory):
    """A store holding one grid run over every document, and what the grid saw."""
    path = str(tmp_path_factory.mktemp("store") / "cola.db")
    store = Store(path)
    seen = {}
    for chain in GRID:
        # chains= scores each document as one packed row (shared_context), whose float
        # rounding may differ from HF's request by request on some CPUs: the grid scores the
        # same way, so a re-evaluation must reproduce it bit for bit
        lm = ColaLM(
            pretrained=tiny_llama_dir, chain=chain, shared_context=True, device="cpu", batch_size=1
        )
        seen[chain] = per_document(lm, task_dir)
    model_id = store.model(lm.identity)
    task_id = store.task(TaskInfo(TASK, "1.0", "0" * 64, "test", "multiple_choice"))
    docs = next(iter(seen.values()))
    ids = store.documents(
        task_id, [DocumentInfo(h, s["doc_id"], s["doc"]) for h, s in docs.items()]
    )
    run_id = store.start_run(model_id, task_id, RunInfo("grid", len(GRID), 0, len(docs)))
    for doc_hash, document_id in ids.items():
        evaluations = [
            EvaluationInfo(
                chain=chain,
                length=len(Chain.parse(chain)),
                metrics={"acc": seen[chain][doc_hash]["acc"]},
                score=seen[chain][doc_hash]["acc_norm"] + seen[chain][doc_hash]["acc"],
                correct=seen[chain][doc_hash]["acc"] == 1.0,
            )
            for chain in GRID
        ]
        store.record_document(run_id, document_id, evaluations, seconds=0.0)
    store.finish_run(run_id)
    return path, run_id, seen


@pytest.mark.parametrize("policy", list(queries.PICKS))
def test_oracle_chains_reproduce_the_recorded_scores(
    searched, tiny_llama_dir, task_dir, policy, caplog
):
    path, run_id, seen = searched
    with Store(path, read_only=True).session() as session:
        picks = {p.doc_hash: p for p in queries.pick(session, [run_id], policy)}
    assert picks, "the grid must have picked something"
    with caplog.at_level(logging.WARNING, logger="lm_eval.cola"):
        lm = ColaLM(
            pretrained=tiny_llama_dir,
            chains=f"store:{path};run={run_id};pick={policy}",
            device="cpu",
            batch_size=1,
        )
    assert "the accuracy reported is an oracle, not a prediction" in caplog.text
    assert f"cola db stats --store {path} --run {run_id}" in caplog.text
    again = per_document(lm, task_dir)
    for doc_hash, sample in again.items():
        if doc_hash in picks:
            recorded = seen[picks[doc_hash].chain][doc_hash]
            assert (sample["acc"], sample["acc_norm"]) == (recorded["acc"], recorded["acc_norm"])
            assert sample["resps"] == recorded["resps"]
        else:  # shortest-correct: no correct chain, so the full model runs
            assert sample["resps"] == seen["0-3"][doc_hash]["resps"]


def test_best_pick_is_highest_score_then_shortest(searched):
    path, run_id, seen = searched
    with Store(path, read_only=True).session() as session:
        picks = queries.pick(session, [run_id], "best")
    assert len(picks) == len(next(iter(seen.values())))
    for p in picks:
        scores = {c: seen[c][p.doc_hash]["acc"] + seen[c][p.doc_hash]["acc_norm"] for c in GRID}
        expected = min(GRID, key=lambda c: (-scores[c], len(Chain.parse(c)), c))
        assert (p.chain, p.score) == (expected, scores[expected])


def test_chains_of_other_weights_are_never_applied(searched, tmp_path, caplog):
    from tests.conftest import save_tiny

    path, run_id, _ = searched
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    with pytest.raises(ChainSourceError, match=r"was made for .* not for the loaded"):
        ColaLM(pretrained=other, chains=f"store:{path};run={run_id}", device="cpu")
    with pytest.raises(ChainSourceError, match="has no run of this model"):
        ColaLM(pretrained=other, chains=f"store:{path}", device="cpu")
    with (
        caplog.at_level(logging.WARNING, logger="lm_eval.cola"),
        pytest.raises(ChainSourceError, match="has no run of this model"),
    ):
        ColaLM(pretrained=other, chains=f"store:{path};run={run_id};on_mismatch=skip", device="cpu")
    assert "skipping it (on_mismatch=skip)" in caplog.text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (";run=99", "has no run '99'"),
        (";pick=longest", "pick=longest: choose one of"),
        (";colour=red", "bad store option 'colour=red'"),
    ],
)
def test_bad_store_options(searched, tiny_llama_dir, option, message):
    path, _, _ = searched
    with pytest.raises(ChainSourceError, match=message):
        ColaLM(pretrained=tiny_llama_dir, chains=f"store:{path}{option}", device="cpu")
