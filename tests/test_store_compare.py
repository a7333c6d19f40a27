"""``cola db compare``: two runs of one task, chain by chain, checked against counts by hand.

Two stores hold the same 4-layer model and task. Run ``cpu`` (first store) finishes documents
0-2 and 4; run ``gpu`` (second store, its documents added in the other order, so ids differ)
finishes 0-3 and has evaluations of document 4 without having finished it. On the three
documents both finished they share some chains and not others, and differ on two shared ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lm_eval_cola.cli import main
from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.store import frames
from lm_eval_cola.store.schema import Evaluation
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo

MODEL = ModelIdentity("tiny", None, "llama", 4, "float32", "cd" * 32)
TASK = TaskInfo("cola_gen", "1.0", "0" * 64, "test", "generate_until")
OTHER_TASK = TaskInfo("other_gen", "1.0", "1" * 64, "test", "generate_until")
DEEPER = ModelIdentity("tiny-deep", None, "llama", 6, "float32", "ef" * 32)
#: Per document: (chain, answer, correct); ``0-3`` is the full model. An answer of None is a
#: chain whose answer was not recorded (a store from before schema 0003).
CPU = {
    0: [("0-3", "B", False), ("0-2", "A", True), ("0.2-3", "C", False)],
    1: [("0-3", "A", True), ("1-3", "A", True)],
    2: [("0-3", "C", False), ("0-1.1-3", "D", False), ("0.3", None, False)],
    4: [("0-3", "A", True)],  # unfinished in gpu: not compared
}
GPU = {
    # 0-2 agrees; 0.2-3 gives another wrong answer (an answer difference, same correctness)
    0: [("0-3", "B", False), ("0-2", "A", True), ("0.2-3", "D", False), ("1-3", "A", True)],
    1: [("0-3", "A", True), ("1-3", "A", True)],
    # 0-1.1-3 corrects document 2 here (answer and correctness differ); 0.3's answer is
    # unrecorded on one side, so only its correctness is compared
    2: [("0-3", "C", False), ("0-1.1-3", "A", True), ("0.3", "B", False)],
    3: [("0-3", "A", True)],  # finished by gpu only
}
UNFINISHED = [("0-3", "A", True)]  # gpu's document 4, evaluated but not finished


def _document(i: int) -> DocumentInfo:
    return DocumentInfo(hashlib.sha256(f"doc {i}".encode()).hexdigest(), i, {"q": f"q{i}"})


def _fill(url: str, name: str, done: dict, order: list[int], **settings) -> None:
    with Store(url) as store:
        model_id = store.model(settings.pop("model", MODEL))
        task_id = store.task(settings.pop("task", TASK))
        ids = store.documents(task_id, [_document(i) for i in order])
        run_id = store.start_run(
            model_id, task_id, RunInfo("mcts", 4, 0, 5, settings=settings, name=name)
        )
        for i, chains in done.items():
            evaluations = [
                EvaluationInfo(chain, 4, {"exact_match": float(c)}, float(c), c, response=answer)
                for chain, answer, c in chains
            ]
            store.record_document(run_id, ids[_document(i).doc_hash], evaluations, 0.5)
        if name == "gpu":  # evaluations of a document still being searched: no done mark
            with store.session() as session:
                session.add_all(
                    Evaluation(
                        run_id=run_id,
                        document_id=ids[_document(4).doc_hash],
                        chain=chain,
                        length=4,
                        metrics={},
                        score=float(c),
                        correct=c,
                        layer_applications=0,
                        seconds=0.0,
                        response=answer,
                    )
                    for chain, answer, c in UNFINISHED
                )


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("compare")
    cpu, gpu = str(folder / "cpu.db"), str(folder / "gpu.db")
    _fill(cpu, "cpu", CPU, order=[0, 1, 2, 3, 4])
    _fill(gpu, "gpu", GPU, order=[4, 3, 2, 1, 0], decoding="batch_invariant")
    _fill(gpu, "gpu-decoy", GPU, order=[4, 3, 2, 1, 0], target="decoy")
    _fill(gpu, "other-task", GPU, order=[0, 1, 2, 3, 4], task=OTHER_TASK)
    _fill(gpu, "deeper", GPU, order=[0, 1, 2, 3, 4], model=DEEPER)
    return cpu, gpu


def test_compare_counts_pairs_full_model_and_rescues(stores) -> None:
    cpu, gpu = stores
    result = frames.compare(cpu, "cpu", "gpu", gpu, show=5)
    assert result.task == "cola_gen"
    assert result.documents == 3  # 0-2: gpu's 3 is not in cpu, its 4 is unfinished
    first, second = result.runs
    assert (first.name, first.model, first.dtype, first.method, first.budget) == (
        "cpu",
        "tiny",
        "float32",
        "mcts",
        4,
    )
    assert (first.decoding, second.decoding) == ("hf", "batch_invariant")
    assert (first.evaluations, second.evaluations) == (8, 9)
    assert result.common == 8  # every cpu chain; gpu's 1-3 on document 0 has no pair
    assert (result.answers_compared, result.answers_differ) == (7, 2)  # 0.3 unrecorded in cpu
    assert result.correctness_differs == 1
    assert not result.identical
    assert (result.full_model_agrees, result.full_model_documents) == (3, 3)
    # the full model is wrong on 0 and 2 in both; cpu rescues 0, gpu 0 and 2
    assert (result.wrong_in_both, result.rescued, result.rescued_by_both) == (2, (1, 2), 1)
    assert result.rescued_by_chance == pytest.approx(1 * 2 / 2)
    differing = [(pair.doc_id, pair.chain) for pair in result.differences]
    assert differing == [(0, "0.2-3"), (2, "0-1.1-3")]
    assert result.differences[1].answers == ("D", "A")
    assert result.differences[1].correct == (False, True)


def test_a_run_against_itself_is_identical(stores) -> None:
    cpu, _ = stores
    result = frames.compare(cpu, "cpu", "cpu")  # one store: both runs read in one session
    assert result.identical and result.common == 9 and result.differences == []
    assert result.rescued == (1, 1) and result.rescued_by_both == 1


def test_show_limits_the_listed_differences(stores) -> None:
    cpu, gpu = stores
    assert len(frames.compare(cpu, "cpu", "gpu", gpu, show=1).differences) == 1
    assert frames.compare(cpu, "cpu", "gpu", gpu, show=0).differences == []


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("gpu-decoy", "run 1 is rewarded by the gold answer and run 2 by the decoy"),
        ("other-task", "run 1 searched cola_gen and run 3 other_gen: compare two runs of one"),
        ("deeper", "run 1's model has 4 layers and run 4's 6: their chains name different"),
        ("nope", "has no run 'nope'"),
        ("gpu --show -1", "--show -1: list 0 or more differing pairs"),
    ],
)
def test_runs_that_do_not_compare_are_refused(stores, other: str, message: str, capsys) -> None:
    cpu, gpu = stores
    argv = ["db", "compare", "--store", cpu, "--run", "cpu", "--other_store", gpu]
    assert main([*argv, "--other_run", *other.split()]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cola db compare: error:") and message in err
    assert err.count("\n") == 1


def test_compare_command_text_and_json(stores, capsys) -> None:
    cpu, gpu = stores
    argv = ["db", "compare", "--store", cpu, "--run", "cpu", "--other_store", gpu]
    assert main([*argv, "--other_run", "gpu"]) == 0
    text = capsys.readouterr().out
    assert "cola_gen, on the 3 documents both runs finished:" in text
    assert f"run 1 (cpu) of {cpu}: tiny float32, mcts budget 4, decoding hf; 8 evaluations" in text
    assert f"run 1 (gpu) of {gpu}: tiny float32, mcts budget 4, decoding batch_invariant" in text
    assert "chains both evaluated on a document: 8; they differ" in text
    assert "answers compared (both recorded): 7, differing: 2" in text
    assert "correctness differing: 1" in text
    assert "full model, same correctness: 3/3 (100.0%)" in text
    assert "1 and 2, 1 by both (1.0 if each run picked its own at random)" in text
    assert "  2, 0-1.1-3: 'D' / 'A', False / True" in text
    assert main([*argv, "--other_run", "gpu", "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["common"] == 8 and found["differences"][0]["chain"] == "0.2-3"


def test_compare_reads_without_writing(stores, tmp_path: Path) -> None:
    cpu, gpu = stores
    before = Path(cpu).read_bytes(), Path(gpu).read_bytes()
    frames.compare(cpu, "cpu", "gpu", gpu)
    assert (Path(cpu).read_bytes(), Path(gpu).read_bytes()) == before
