"""Two runs of one task, chain by chain (``cola db compare``): does a search repeat?

A stored oracle is worth citing only if the same search gives it again elsewhere: on another
machine, device, dtype or decoding mode (``--decoding hf`` against ``batch_invariant``). The
runs may sit in different stores, so each is read in its own session and the two are matched
in Python, by document content (``doc_hash``) and chain text: every chain both runs evaluated
on a document both finished is a paired observation, and any difference in its answer or its
correctness is listed. Rescues (an originally wrong document that some chain gets right) are
compared too, against what two independent draws of that many documents would share.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lm_eval_cola.chain import Chain
from lm_eval_cola.store.controls import target_of
from lm_eval_cola.store.schema import (
    Document,
    Evaluation,
    Run,
    RunDocument,
    decoded_batch_invariantly,
)

#: A run's outcomes: per document hash, its id in the task and per chain (correct, answer).
Outcomes = dict[str, tuple[int, dict[str, tuple[bool, str | None]]]]


@dataclass(frozen=True)
class Pair:
    """One chain evaluated on one document by both runs: (first run, second run)."""

    doc_id: int
    chain: str
    answers: tuple[str | None, str | None]
    correct: tuple[bool, bool]

    @property
    def answered(self) -> bool:
        """Both runs recorded the answer (schema 0003 on)."""
        return None not in self.answers

    @property
    def differs(self) -> bool:
        """Correctness differs, or both answers are recorded and differ."""
        answers_differ = self.answered and self.answers[0] != self.answers[1]
        return answers_differ or self.correct[0] != self.correct[1]


@dataclass(frozen=True)
class Side:
    """What one of the two runs is: the settings a repetition would change."""

    run_id: int
    name: str | None
    model: str
    dtype: str
    method: str
    budget: int
    decoding: str
    #: evaluations on the documents both runs finished
    evaluations: int


@dataclass(frozen=True)
class Comparison:
    """Two runs on the documents both finished; pairs are (first run, second run)."""

    task: str
    runs: tuple[Side, Side]
    documents: int
    #: chains both runs evaluated on the same document
    common: int
    #: of those, pairs whose answers both runs recorded (schema 0003 on)
    answers_compared: int
    answers_differ: int
    correctness_differs: int
    #: documents where the full model's correctness is the same in both runs, of those both
    #: evaluated it on
    full_model_agrees: int
    full_model_documents: int
    #: documents the full model gets wrong in both runs, and those some chain corrects
    wrong_in_both: int
    rescued: tuple[int, int]
    rescued_by_both: int
    #: the first pairs that differ
    differences: list[Pair]

    @property
    def identical(self) -> bool:
        """Every paired chain gave the same correctness, and the same answer where recorded."""
        return not self.answers_differ and not self.correctness_differs

    @property
    def rescued_by_chance(self) -> float:
        """Rescues the two runs would share if each picked its documents independently."""
        if not self.wrong_in_both:
            return 0.0
        return self.rescued[0] * self.rescued[1] / self.wrong_in_both


def check_comparable(first: Run, second: Run) -> None:
    """Refuse, before reading any evaluation, two runs of different tasks, depths or targets:
    a chain names layers by index, so "0-5" of a 30-layer model is not "0-5" of a 24-layer one,
    and a chain correct for the decoy answer is not comparable with one correct for the gold."""
    tasks = first.task.name, second.task.name
    if tasks[0] != tasks[1]:
        raise ValueError(
            f"run {first.id} searched {tasks[0]} and run {second.id} {tasks[1]}: compare two "
            "runs of one task"
        )
    depths = first.model.n_layers, second.model.n_layers
    if depths[0] != depths[1]:
        raise ValueError(
            f"run {first.id}'s model has {depths[0]} layers and run {second.id}'s {depths[1]}: "
            "their chains name different layers; compare runs of one model (another machine, "
            "dtype or decoding)"
        )
    targets = target_of(first), target_of(second)
    if targets[0] != targets[1]:
        raise ValueError(
            f"run {first.id} is rewarded by the {targets[0]} answer and run {second.id} by the "
            f"{targets[1]}: compare two runs of one target (cola db controls compares gold with "
            "decoy)"
        )


def compare(
    first: Session, first_run: int, second: Session, second_run: int, show: int = 10
) -> Comparison:
    """The two runs on the documents both finished; the first ``show`` differences listed."""
    runs = first.get(Run, first_run), second.get(Run, second_run)
    check_comparable(*runs)
    a, b = outcomes(first, first_run), outcomes(second, second_run)
    shared = sorted(set(a) & set(b), key=lambda doc_hash: a[doc_hash][0])
    pairs = [
        _pair(a[h], b[h], chain) for h in shared for chain in sorted(set(a[h][1]) & set(b[h][1]))
    ]
    answered = [pair for pair in pairs if pair.answered]
    identity = _identity(runs[0]), _identity(runs[1])
    full = [
        (a[h][1][identity[0]][0], b[h][1][identity[1]][0], h)
        for h in shared
        if identity[0] in a[h][1] and identity[1] in b[h][1]
    ]
    wrong = [h for right_a, right_b, h in full if not right_a and not right_b]
    rescued = [{h for h in wrong if _any_correct(run[h][1])} for run in (a, b)]
    return Comparison(
        task=runs[0].task.name,
        runs=(
            _side(runs[0], sum(len(a[h][1]) for h in shared)),
            _side(runs[1], sum(len(b[h][1]) for h in shared)),
        ),
        documents=len(shared),
        common=len(pairs),
        answers_compared=len(answered),
        answers_differ=sum(pair.answers[0] != pair.answers[1] for pair in answered),
        correctness_differs=sum(pair.correct[0] != pair.correct[1] for pair in pairs),
        full_model_agrees=sum(right_a == right_b for right_a, right_b, _ in full),
        full_model_documents=len(full),
        wrong_in_both=len(wrong),
        rescued=(len(rescued[0]), len(rescued[1])),
        rescued_by_both=len(rescued[0] & rescued[1]),
        differences=[pair for pair in pairs if pair.differs][:show],
    )


def outcomes(session: Session, run_id: int) -> Outcomes:
    """Every evaluation of the run's finished documents (a document still being searched has
    only some of its chains, which would read as chains the other run tried alone)."""
    rows = session.execute(
        select(
            Document.doc_hash,
            Document.doc_id,
            Evaluation.chain,
            Evaluation.correct,
            Evaluation.response,
        )
        .join(Document, Document.id == Evaluation.document_id)
        .join(
            RunDocument,
            (RunDocument.document_id == Evaluation.document_id)
            & (RunDocument.run_id == Evaluation.run_id),
        )
        .where(Evaluation.run_id == run_id)
    )
    found: Outcomes = {}
    for doc_hash, doc_id, chain, correct, response in rows:
        found.setdefault(doc_hash, (doc_id, {}))[1][chain] = (bool(correct), response)
    return found


def _pair(a, b, chain: str) -> Pair:
    """``chain`` on one document, from each run's (doc_id, chains) of it."""
    (correct_a, answer_a), (correct_b, answer_b) = a[1][chain], b[1][chain]
    return Pair(a[0], chain, (answer_a, answer_b), (correct_a, correct_b))


def _side(run: Run, evaluations: int) -> Side:
    decoding = "batch_invariant" if decoded_batch_invariantly(run.settings) else "hf"
    model = run.model
    return Side(
        run.id, run.name, model.name, model.dtype, run.method, run.budget, decoding, evaluations
    )


def _identity(run: Run) -> str:
    """The full model's chain in the run's model."""
    return str(Chain.identity(run.model.n_layers))


def _any_correct(chains: dict[str, tuple[bool, str | None]]) -> bool:
    return any(correct for correct, _ in chains.values())
