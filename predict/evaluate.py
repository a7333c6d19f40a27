"""Judging predictors on documents they never saw.

For each held-out document, the identity chain, the best static chain and each predictor's
chain are scored with the same lm-eval objective the search uses (so the figures are those
``lm_eval --model cola`` reports). A document any predictor trained on is a leak: the
evaluation refuses to start, whichever split the documents come from.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.predict.features import PromptStates, prompt_of
from lm_eval_cola.predict.predictors import Predictor
from lm_eval_cola.search.objective import Objective
from lm_eval_cola.tasks import Document, task_documents


class LeakError(ValueError):
    """Evaluation documents overlap a predictor's training documents."""


@dataclass(frozen=True)
class PredictorScore:
    """One predictor on the held-out documents."""

    predictor: str
    documents: int
    accuracy: float
    identity_accuracy: float
    static_accuracy: float
    mean_chain_length: float
    feature_layers: int  # per document, for the prompt states
    n_layers: int
    differs_from_identity: float  # share of documents
    static_chain: str


def check_fit(predictors: list[Predictor], fingerprint: str, task: str) -> None:
    """Every predictor was trained for this model and this task."""
    for predictor in predictors:
        info = predictor.info
        if info.model["fingerprint"] != fingerprint:
            raise ValueError(
                f"the '{info.kind}' predictor was trained for {info.model['name']}, not for the "
                "loaded model (fingerprints differ); load that model with --model_args"
            )
        if info.task != task:
            raise ValueError(
                f"the '{info.kind}' predictor was trained on task '{info.task}', not '{task}'"
            )


def check_no_leak(predictors: list[Predictor], documents: list[Document]) -> None:
    hashes = {d.doc_hash for d in documents}
    for predictor in predictors:
        seen = hashes.intersection(predictor.info.training_hashes)
        if seen:
            raise LeakError(
                f"{len(seen)} of the {len(hashes)} evaluation documents were used to train the "
                f"'{predictor.info.kind}' predictor (its training split: "
                f"{predictor.info.split}); evaluate on another split, e.g. --split test"
            )


class _Correctness:
    """Whether a chain answers a document, each (document, chain) scored once. The identity
    is scored first on each document: graded metrics judge a chain against it."""

    def __init__(self, objective: Objective, identity: Chain) -> None:
        self.objective, self.identity = objective, identity
        self._correct: dict[tuple[str, Chain], bool] = {}
        self._reference: dict[str, float] = {}

    def __call__(self, document: Document, chain: Chain) -> bool:
        key = (document.doc_hash, chain)
        if key not in self._correct:
            reference = None
            if chain != self.identity:
                self(document, self.identity)
                reference = self._reference[document.doc_hash]
            trial = self.objective.score(document, chain, reference)
            if chain == self.identity:
                self._reference[document.doc_hash] = trial.score
            self._correct[key] = trial.correct
        return self._correct[key]


def evaluate(
    lm, task, predictors: list[Predictor], limit: int | None = None
) -> list[PredictorScore]:
    """Score every predictor (and the identity and best static chains) on the task's documents."""
    check_fit(predictors, lm.identity.fingerprint, task.config.task)
    documents = task_documents(task, limit)
    check_no_leak(predictors, documents)
    identity = Chain.identity(lm.executor.n_layers)
    correct = _Correctness(Objective(lm, task, predictors[0].info.metric), identity)
    encoders = {p.info.spec: PromptStates(lm, p.info.spec) for p in predictors if p.reads_prompt}
    chosen: dict[str, list[Chain]] = {p.info.kind: [] for p in predictors}
    for document in tqdm(documents, desc="Evaluating predictors"):
        prompt = prompt_of(document.instances)
        states = {spec: encode(prompt) for spec, encode in encoders.items()}
        for predictor in predictors:
            chain = predictor.predict(states.get(predictor.info.spec))
            chosen[predictor.info.kind].append(chain)
            correct(document, chain)
    return [
        _summary(predictor, documents, chosen[predictor.info.kind], correct, identity)
        for predictor in predictors
    ]


def _summary(
    predictor: Predictor,
    documents: list[Document],
    chains: list[Chain],
    correct: _Correctness,
    identity: Chain,
) -> PredictorScore:
    static = Chain.parse(predictor.info.static_chain)
    return PredictorScore(
        predictor=predictor.info.kind,
        documents=len(documents),
        accuracy=_mean(correct(d, c) for d, c in zip(documents, chains, strict=True)),
        identity_accuracy=_mean(correct(d, identity) for d in documents),
        static_accuracy=_mean(correct(d, static) for d in documents),
        mean_chain_length=_mean(len(c) for c in chains),
        feature_layers=predictor.info.spec.layer if predictor.reads_prompt else 0,
        n_layers=len(identity),
        differs_from_identity=_mean(c != identity for c in chains),
        static_chain=str(static),
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
