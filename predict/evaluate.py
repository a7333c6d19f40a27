"""Judging predictors on documents they never saw.

For each held-out document, the identity chain, the best static chain and each predictor's
chain are scored with the same lm-eval objective the search uses (so the figures are those
``lm_eval --model cola`` reports). A document any predictor trained on is a leak: the
evaluation refuses to start, whichever split the documents come from.

Accuracy is a predictor's one chain per document, chosen without the gold answer. Its change
against the identity chain comes with a paired 95% interval (bootstrap over documents) and
McNemar's exact test, since both are scored on the same documents. ``oracle@k`` (any of the
predictor's ``k`` best chains right, which only the gold answer can pick) is reported in its
own field, never as accuracy. A task other than the one the predictors trained on is judged
out of domain, with its own default metric when it lacks theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.errors import ColaError
from lm_eval_cola.fingerprint import ModelIdentity, require_match
from lm_eval_cola.predict.dataset import DOCUMENTS_AT_ONCE
from lm_eval_cola.predict.features import PromptStates, prompt_of
from lm_eval_cola.predict.predictors import Predictor
from lm_eval_cola.sampling import seed_for
from lm_eval_cola.scoring import Objective, Proposal
from lm_eval_cola.statistics import mcnemar, paired_interval
from lm_eval_cola.tasks import Document, TaskSpec, task_documents

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM


class LeakError(ColaError, ValueError):
    """Evaluation documents overlap a predictor's training documents."""


@dataclass(frozen=True)
class PredictorScore:
    """One predictor on the held-out documents of one task."""

    predictor: str
    task: str
    in_domain: bool  # the task the predictor trained on
    documents: int
    accuracy: float
    identity_accuracy: float
    #: accuracy - identity accuracy, with its paired 95% bootstrap interval
    delta: float
    delta_low: float
    delta_high: float
    mcnemar_p: float  # exact two-sided test of the paired difference
    static_accuracy: float
    mean_chain_length: float
    feature_layers: int  # per document, for the prompt states
    #: the predictor's own cost per document in decoder-layer applications (its feature
    #: layers; routers' MLPs as a share of a layer over the prompt)
    predictor_layers: float
    layers_run: float  # mean chain length + predictor layers
    n_layers: int
    depth: float  # layers_run / n_layers
    differs_from_identity: float  # share of documents
    static_chain: str
    k: int
    #: any of the predictor's k best chains right: an oracle (the gold answer picks), not an
    #: accuracy; None for predictors that give one chain
    oracle_at_k: float | None
    #: the same oracle over a fixed menu: the first k of the predictor's training candidates
    #: (the identity, then the chains right on the most training documents), the same k
    #: chains for every document; a predictor's k chains adapt to the input only if they beat it
    menu_at_k: float = 0.0
    #: the full model's own k samples (generation tasks, else None): any of them right, at the
    #: best of :data:`SAMPLING_TEMPERATURES`; a predictor's k chains must beat it as well
    sampling_at_k: float | None = None


#: The full model's sampling temperatures that sampling@k takes the best of.
SAMPLING_TEMPERATURES = (0.3, 0.7, 1.0)


def check_fit(predictors: list[Predictor], loaded: ModelIdentity) -> None:
    """Every predictor was trained for this model."""
    for predictor in predictors:
        what, model = f"the '{predictor.info.kind}' predictor", predictor.info.model
        option = "--predictors <its file>"
        require_match(what, model["name"], model["fingerprint"], loaded, option)


def spec_for(predictors: list[Predictor], task) -> TaskSpec:
    """The task judged by the predictors' metric, else by its default (out of domain)."""
    metric = predictors[0].info.metric
    return TaskSpec(task.config.task, metric=metric if metric in task.higher_is_better() else None)


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
    """Whether a chain answers a document, each (document, chain) scored once, many documents
    per pass, the identity among them (the objective's reference, and the baseline)."""

    def __init__(self, objective: Objective) -> None:
        self.objective, self.identity = objective, objective.identity
        self._correct: dict[tuple[str, Chain], bool] = {}

    def fill(self, pairs: list[tuple[Document, Chain]]) -> None:
        """Score the (document, chain) pairs not scored yet, and the identity on each."""
        documents = {d.doc_hash: d for d, _ in pairs}
        wanted = [(h, self.identity) for h in documents] + [(d.doc_hash, c) for d, c in pairs]
        new = [pair for pair in dict.fromkeys(wanted) if pair not in self._correct]
        proposals = [Proposal(documents[h], chain) for h, chain in new]
        trials = self.objective.score_all(proposals, DOCUMENTS_AT_ONCE, "Scoring chains")
        for pair, trial in zip(new, trials, strict=True):
            self._correct[pair] = trial.correct

    def __call__(self, document: Document, chain: Chain) -> bool:
        if (document.doc_hash, chain) not in self._correct:
            self.fill([(document, chain)])
        return self._correct[(document.doc_hash, chain)]


def evaluate(
    lm: ChainLM, task, predictors: list[Predictor], limit: int | None = None, k: int = 5
) -> list[PredictorScore]:
    """Score every predictor (and the identity and best static chains) on the task's
    documents, with each predictor's ``k`` best chains for oracle@k."""
    check_fit(predictors, lm.identity)
    documents = task_documents(task, limit)
    check_no_leak(predictors, documents)
    correct = _Correctness(Objective(lm, task, spec_for(predictors, task)))
    encoders = {p.info.spec: PromptStates(lm, p.info.spec) for p in predictors if p.reads_prompt}
    # per predictor, per document: its ranked chains and its own cost in layers
    ranked: list[list[list[Chain]]] = [[] for _ in predictors]
    own: list[list[float]] = [[] for _ in predictors]
    for document in tqdm(documents, desc=f"Predicting chains on {task.config.task}"):
        prompt = prompt_of(document.instances)
        states = {spec: encode(prompt) for spec, encode in encoders.items()}
        for index, predictor in enumerate(predictors):
            chains = predictor.chains_for(lm, prompt, states.get(predictor.info.spec), k)
            ranked[index].append(chains)
            own[index].append(predictor.own_layers(lm, prompt))
    fixed = {Chain.parse(p.info.static_chain) for p in predictors}
    fixed |= {chain for p in predictors for chain in menu(p, k)}
    pairs = [(d, c) for d in documents for c in fixed]
    for per_document in ranked:
        pairs += [(d, c) for d, chains in zip(documents, per_document, strict=True) for c in chains]
    correct.fill(pairs)
    sampled = sampling_at_k(correct.objective, documents, k)
    return [
        _summary(predictor, task.config.task, documents, chains, _mean(cost), correct, k, sampled)
        for predictor, chains, cost in zip(predictors, ranked, own, strict=True)
    ]


def sampling_at_k(objective: Objective, documents: list[Document], k: int) -> float | None:
    """The share of documents one of the full model's own ``k`` samples gets right, at the
    best of :data:`SAMPLING_TEMPERATURES`; ``None`` unless the task generates one answer
    judged right or wrong."""
    if objective.output_type != "generate_until" or not objective.binary:
        return None
    hits = dict.fromkeys(SAMPLING_TEMPERATURES, 0)
    for document in tqdm(documents, desc="Sampling the full model"):
        for temperature in SAMPLING_TEMPERATURES:
            trials = objective.sampled(
                document, k, temperature, seed_for(0, document.doc_hash, temperature)
            )
            hits[temperature] += any(t.correct for t in trials)
    return max(hits.values()) / len(documents) if documents else 0.0


def menu(predictor: Predictor, k: int) -> list[Chain]:
    """The fixed menu a predictor's top k is judged against (:attr:`PredictorScore.menu_at_k`)."""
    return [Chain.parse(chain) for chain in predictor.info.candidates[:k]]


def _summary(
    predictor: Predictor,
    task: str,
    documents: list[Document],
    ranked: list[list[Chain]],
    own: float,
    correct: _Correctness,
    k: int,
    sampled: float | None,
) -> PredictorScore:
    identity = correct.identity
    static = Chain.parse(predictor.info.static_chain)
    chosen = [correct(d, chains[0]) for d, chains in zip(documents, ranked, strict=True)]
    reference = [correct(d, identity) for d in documents]
    low, high = paired_interval(chosen, reference)
    length = _mean(len(chains[0]) for chains in ranked)
    features = predictor.info.spec.layer if predictor.reads_prompt else 0
    any_right = [
        any(correct(d, c) for c in chains) for d, chains in zip(documents, ranked, strict=True)
    ]
    return PredictorScore(
        predictor=predictor.info.kind,
        task=task,
        in_domain=task == predictor.info.task,
        documents=len(documents),
        accuracy=_mean(chosen),
        identity_accuracy=_mean(reference),
        delta=_mean(chosen) - _mean(reference),
        delta_low=low,
        delta_high=high,
        mcnemar_p=mcnemar(chosen, reference),
        static_accuracy=_mean(correct(d, static) for d in documents),
        mean_chain_length=length,
        feature_layers=features,
        predictor_layers=own,
        layers_run=length + own,
        n_layers=len(identity),
        depth=(length + own) / len(identity),
        differs_from_identity=_mean(chains[0] != identity for chains in ranked),
        static_chain=str(static),
        k=k,
        oracle_at_k=_mean(any_right) if max(map(len, ranked), default=0) > 1 else None,
        menu_at_k=_mean(any(correct(d, c) for c in menu(predictor, k)) for d in documents),
        sampling_at_k=sampled,
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
