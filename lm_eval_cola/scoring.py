"""Scoring a chain on a document: the one judge that search, controls and predictors share.

For each (document, chain) proposal the document's requests, built by lm-eval's task API
(:mod:`lm_eval_cola.tasks`), run under the chain through :meth:`ColaLM.run_requests`: all
proposals in one forward pass (generation: one per distinct chain), each document's shared
context computed once, and every chain prefix already computed on the document (a packed row,
or a generation's prompt prefill) looked up in a prefix cache. The task's own filters
and ``process_results`` turn the responses into metrics, and the chosen metric becomes the
score. So a chain scored here scores the same when the task is re-evaluated through
``lm_eval --model cola``.

The reference rule lives here and only here: on a metric that is not right/wrong, a chain is
"correct" when it scores at least as well as the full model on the same document, so the
full model (the identity chain) is scored on a document before any other chain is judged
there (:meth:`Objective.score_all` puts it first; :meth:`Objective.score_many` scores it in a
pass of its own when a caller did not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.task import Task
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import PrefixCache, Work, return_freed_memory
from lm_eval_cola.lm import ChainLM, RunOptions, RunResult
from lm_eval_cola.sampling import sample
from lm_eval_cola.targets import judged_by
from lm_eval_cola.tasks import Document, TaskSpec, check_task, filters_of

#: Metrics whose per-document value is 1 for a right answer and 0 for a wrong one.
BINARY_PREFIXES = ("acc", "exact_match", "em")
#: Generated answers are kept up to this many characters: every short answer whole, and enough
#: of a long one to tell answers apart.
RESPONSE_CHARS = 128


@dataclass(frozen=True)
class Trial:
    """A chain evaluated on the document: its score under the task's metric, and its cost."""

    chain: Chain
    score: float
    correct: bool
    metrics: dict[str, Any]
    layer_applications: int = 0
    token_layer_applications: int = 0
    #: of which in generation's decoding steps
    decode_token_layers: int = 0
    #: a key per decoding step of its generation, naming the tokens so far (chains that
    #: generated the same tokens share a key, and can share the step's work)
    decode_steps: tuple[str, ...] = ()
    seconds: float = 0.0
    #: the answer the chain gave (:func:`response`)
    response: str | None = None

    @property
    def length(self) -> int:
        return len(self.chain)


@dataclass(frozen=True)
class Proposal:
    """A chain to score on a document."""

    document: Document
    chain: Chain


class Objective:
    """Scores chains on the documents of one task with one model (a ``cola`` backend)."""

    def __init__(
        self,
        lm: ChainLM,
        task: Task,
        spec: TaskSpec | None = None,
        prefix_cache_mb: float = 0.0,
        target: str = "gold",
        batch_invariant: bool = False,
    ) -> None:
        """``spec`` says which metric and filter judge (the task's defaults when ``None``);
        ``batch_invariant``: generations decode in mixed-chain batches (a search's mode)."""
        self.lm, self.task = lm, task
        #: the task as it judges answers: against the gold answer, or a decoy (targets.py)
        self.judge = judged_by(task, target)
        self.output_type = task.get_config("output_type")
        spec = spec or TaskSpec(task.config.task)
        self.metric, self.filter_name = check_task(task, spec.metric, spec.filter_name)
        self.higher_is_better = task.higher_is_better().get(self.metric, True)
        self.binary = self.metric.startswith(BINARY_PREFIXES)
        self.identity = Chain.identity(lm.executor.n_layers)
        #: the full model's score on each document scored so far: graded metrics' reference
        self.references: dict[str, float] = {}
        cache = PrefixCache(prefix_cache_mb) if prefix_cache_mb > 0 else None
        self.options = RunOptions(
            shared_context=True,
            prefix_cache=cache,
            one_batch=True,
            share_calls=True,
            batch_invariant=batch_invariant,
        )

    def score(self, document: Document, chain: Chain) -> Trial:
        return self.score_many([Proposal(document, chain)])[0]

    def score_many(self, proposals: Sequence[Proposal]) -> list[Trial]:
        """Score every proposal (on distinct documents) in one pass over the model; on a
        graded metric, the full model first where a document has no reference yet."""
        _check_distinct_documents(proposals)
        if not self.binary:
            self.score_references([p.document for p in proposals if p.chain != self.identity])
        start = time.perf_counter()
        work, steps = self._respond(proposals)
        return_freed_memory()
        seconds = (time.perf_counter() - start) / len(proposals)
        return [
            self.trial(p, work[p.document.doc_hash], steps[p.document.doc_hash], seconds)
            for p in proposals
        ]

    def score_all(
        self,
        proposals: Sequence[Proposal],
        at_once: int = 16,
        desc: str | None = None,
        on_pass: Callable[[list[Proposal], list[Trial]], None] | None = None,
    ) -> list[Trial]:
        """Score any proposals, passes of up to ``at_once`` distinct documents: the full
        model's first, in passes of their own (the reference), then the others with a chain's
        proposals kept together (a generation pass decodes once per distinct chain); trials
        come in the proposals' order. ``desc`` shows a progress bar; ``on_pass`` gets each
        pass's proposals and trials as they are done, so a caller can keep them before a
        long check ends (or dies)."""
        trials: list[Trial] = [None] * len(proposals)  # type: ignore[list-item]
        first = [i for i, p in enumerate(proposals) if p.chain == self.identity]
        later = [i for i, p in enumerate(proposals) if p.chain != self.identity]
        with tqdm(total=len(proposals), desc=desc, disable=desc is None or not proposals) as bar:
            for indices in (first, later):
                for chunk in _passes([proposals[i] for i in indices], at_once):
                    done = [proposals[indices[i]] for i in chunk]
                    scored = self.score_many(done)
                    for index, trial in zip(chunk, scored, strict=True):
                        trials[indices[index]] = trial
                    if on_pass is not None:
                        on_pass(done, scored)
                    bar.update(len(chunk))
        return trials

    def remember_reference(self, doc_hash: str, score: float) -> None:
        """The full model's score on a document, measured before (a store's record)."""
        self.references.setdefault(doc_hash, score)

    def score_references(self, documents: Sequence[Document]) -> None:
        """The full model's score on each document that has none yet: a graded metric judges
        a chain against it, so it must exist before that chain's trial."""
        missing = {d.doc_hash: d for d in documents if d.doc_hash not in self.references}
        if missing:
            self.score_many([Proposal(d, self.identity) for d in missing.values()])

    def stream(self) -> ScoringStream:
        """Proposals scored as they come (:class:`ScoringStream`)."""
        return ScoringStream(self)

    def _respond(
        self, proposals: Sequence[Proposal]
    ) -> tuple[dict[str, Work], dict[str, list[str]]]:
        """Run the proposals' requests, one call per request type; fills their responses.
        Returns each document's work and the keys of its generations' decoding steps."""
        work = {p.document.doc_hash: Work() for p in proposals}
        steps: dict[str, list[str]] = {p.document.doc_hash: [] for p in proposals}
        for request_type, (requests, chains, documents) in _requests(proposals).items():
            result = self.lm.run_requests(request_type, requests, chains, self.options, documents)
            _fill(requests, result, work, steps)
        return work, steps

    def sampled(self, document: Document, k: int, temperature: float, seed: int) -> list[Trial]:
        """The full model's own ``k`` samples to the document's one generation request
        (:func:`~lm_eval_cola.sampling.sample`), each judged as a chain's answer is."""
        outputs = sample(self.lm, document.instances[0], k, temperature, seed)
        return self.judge_outputs(document, outputs)

    def judge_outputs(self, document: Document, outputs: Sequence[str]) -> list[Trial]:
        """Each of ``outputs`` as the answer to the document's one generation request, judged
        as a chain's answer is: the full model's own samples (``cola controls sampling``)."""
        (instance,) = document.instances
        trials = []
        for output in outputs:
            instance.resps, instance.filtered_resps = [output], {}
            trials.append(self.trial(Proposal(document, self.identity), Work(), [], 0.0))
        return trials

    def trial(self, proposal: Proposal, work: Work, steps: list[str], seconds: float) -> Trial:
        """The proposal judged on the responses its document's requests now hold: public so
        that a stream, which fills those responses as generations finish, judges exactly as
        :meth:`score_many` does."""
        document = proposal.document
        for ensemble in filters_of(self.task):
            ensemble.apply(document.instances)
        results = [i.filtered_resps[self.filter_name] for i in document.instances]
        metrics = self.judge.process_results(document.doc, results)
        answer = response(self.task, self.output_type, self.metric, document.doc, results)
        score = _as_score(metrics[self.metric], self.higher_is_better)
        if proposal.chain == self.identity:
            self.remember_reference(document.doc_hash, score)
        # The full model is correct by definition on a graded metric (scored again in another
        # batch, its last bits may differ on some CPUs); another chain when it does at least
        # as well there.
        if self.binary:
            correct = score >= 1.0
        else:
            correct = proposal.chain == self.identity or score >= self.references[document.doc_hash]
        return Trial(
            chain=proposal.chain,
            score=score,
            correct=correct,
            metrics={k: _jsonable(v) for k, v in metrics.items()},
            layer_applications=work.layer_applications,
            token_layer_applications=work.token_layer_applications,
            decode_token_layers=work.decode_token_layers,
            decode_steps=tuple(steps),
            seconds=seconds,
            response=answer,
        )

    def row_tokens(self, document: Document) -> int | None:
        """What one layer must process of the document at the physical limit, once per chain
        prefix: its packed row (its requests' distinct token positions) for loglikelihood
        tasks, its prompt for a generation task with one request; else ``None``."""
        types = {i.request_type for i in document.instances}
        if types == {"loglikelihood"}:
            return len(self.lm.packed_row([i.args for i in document.instances]))
        if types == {"generate_until"} and len(document.instances) == 1:
            return len(self.lm.tok_encode(document.instances[0].args[0]))
        return None


class ScoringStream:
    """Proposals scored as they come, so that a search need not wait for the slowest of its
    documents: a generated-answer task in the batch-invariant mode decodes every proposal in
    flight together (:class:`~lm_eval_cola.lm.GenerationStream`), a proposal joining while
    others decode, and :meth:`finished` hands back each as soon as its generation ends. Any
    other task scores what was submitted in one pass (:meth:`Objective.score_many`). Each
    proposal's trial is the one :meth:`Objective.score` gives, bit for bit."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        options = objective.options
        streams = options.batch_invariant and objective.output_type == "generate_until"
        self.generations = objective.lm.generation_stream(options.prefix_cache) if streams else None
        #: what was submitted and not yet finished, with each one's tag and seconds so far
        self.pending: dict[Any, tuple[Proposal, Any, float]] = {}

    @property
    def overlaps(self) -> bool:
        """Whether proposals of one document may be scored at once: a stream judges each as
        its generation ends, filling the document's requests just before, so they never hold
        two proposals' answers; a pass fills them for all its proposals first."""
        return self.generations is not None

    @property
    def room(self) -> int:
        """Generations the stream's next decoding step would leave its rows to (0 outside the
        stream's mode): what a search may fill with chains ahead at no cost to the others."""
        return self.generations.room if self.generations is not None else 0

    def submit(self, proposal: Proposal, tag: Any = None) -> None:
        """Score ``proposal``; :meth:`finished` hands its trial back with ``tag``."""
        if not self.overlaps:
            _check_distinct_documents([p for p, _, _ in self.pending.values()] + [proposal])
        if not self.objective.binary and proposal.chain != self.objective.identity:
            self.objective.score_references([proposal.document])
        key = object()
        if self.generations is not None:
            ((_, requests),) = _requests([proposal]).items()
            key = self.generations.submit(*requests)
        self.pending[key] = (proposal, tag, 0.0)

    def finished(self) -> list[tuple[Any, Trial]]:
        """Score one decoding step (every proposal, outside the stream's mode); returns the
        tag and trial of each proposal done, maybe none, so that a caller can submit more
        between steps."""
        if not self.pending:
            return []
        if self.generations is None:
            pending, self.pending = list(self.pending.values()), {}
            trials = self.objective.score_many([proposal for proposal, _, _ in pending])
            return [(tag, trial) for (_, tag, _), trial in zip(pending, trials, strict=True)]
        start = time.perf_counter()
        done = self.generations.step()
        share = (time.perf_counter() - start) / len(self.pending)
        self.pending = {k: (p, tag, t + share) for k, (p, tag, t) in self.pending.items()}
        return_freed_memory()
        return [self._finish(submission) for submission in done]

    def _finish(self, submission) -> tuple[Any, Trial]:
        proposal, tag, seconds = self.pending.pop(submission)
        document = proposal.document.doc_hash
        work, steps = {document: Work()}, {document: []}
        for instance in submission.requests:  # another proposal of the document filled them
            instance.resps, instance.filtered_resps = [], {}
        _fill(submission.requests, self.generations.result(submission), work, steps)
        return tag, self.objective.trial(proposal, work[document], steps[document], seconds)


def _check_distinct_documents(proposals: Sequence[Proposal]) -> None:
    """Proposals scored at once are on distinct documents: they share a document's requests."""
    documents = [p.document.doc_hash for p in proposals]
    if len(set(documents)) < len(documents):
        raise ValueError("one proposal per document at a time: they share its requests")


def _requests(
    proposals: Sequence[Proposal],
) -> dict[str, tuple[list[Instance], list[Chain], list[str]]]:
    """The proposals' requests by type, each with its chain and document (a request repeated
    as lm-eval repeats it), their responses emptied."""
    by_type: dict[str, tuple[list[Instance], list[Chain], list[str]]] = {}
    for proposal in proposals:
        for instance in proposal.document.instances:
            instance.resps, instance.filtered_resps = [], {}
            requests, chains, documents = by_type.setdefault(instance.request_type, ([], [], []))
            for _ in range(instance.repeats):
                requests.append(instance)
                chains.append(proposal.chain)
                documents.append(proposal.document.doc_hash)
    return by_type


def _fill(
    requests: Sequence[Instance],
    result: RunResult,
    work: dict[str, Work],
    steps: dict[str, list[str]],
) -> None:
    """The requests' responses, and their documents' work and decoding steps, from a run."""
    for instance, output in zip(requests, result.outputs, strict=True):
        instance.resps.append(output)
    for document, spent in result.work.items():
        work[document] = work[document] + spent
    for document, keys in result.decode_steps.items():
        steps[document] += keys


def _passes(proposals: Sequence[Proposal], at_once: int) -> list[list[int]]:
    """Indices of ``proposals`` in passes of up to ``at_once`` distinct documents, a chain's
    proposals together, chains in order of first appearance."""
    first: dict[Chain, int] = {}
    for proposal in proposals:
        first.setdefault(proposal.chain, len(first))
    pending = sorted(range(len(proposals)), key=lambda i: first[proposals[i].chain])
    passes = []
    while pending:
        chunk, documents, later = [], set(), []
        for index in pending:
            document = proposals[index].document.doc_hash
            if len(chunk) < at_once and document not in documents:
                chunk.append(index)
                documents.add(document)
            else:
                later.append(index)
        passes.append(chunk)
        pending = later
    return passes


def response(task: Task, output_type: str, metric: str, doc: dict, results: list) -> str | None:
    """The answer a chain gave, from the task's filtered responses: for a multiple-choice task
    the index of the option chosen as ``metric`` chooses it (``acc_norm`` divides each option's
    log-likelihood by its length in characters, as lm-eval does), for a generation task the
    filtered answer, cut to :data:`RESPONSE_CHARS`; ``None`` for other kinds of task."""
    if output_type == "multiple_choice":
        scores = [float(ll) for ll, _ in results]
        if metric == "acc_norm":
            lengths = [len(choice) for choice in task.doc_to_choice(doc)]
            scores = [s / max(n, 1) for s, n in zip(scores, lengths, strict=True)]
        return str(max(range(len(scores)), key=scores.__getitem__))
    if output_type == "generate_until":
        return str(results[0])[:RESPONSE_CHARS]
    return None


def _as_score(value: Any, higher_is_better: bool) -> float:
    """A per-document metric as a number where higher is better.

    Corpus-level metrics such as perplexity report (log-likelihood, weight) per document; the
    score is then the log-likelihood per unit of weight.
    """
    if isinstance(value, tuple | list) and len(value) == 2:
        return float(value[0]) / max(float(value[1]), 1e-12)
    return float(value) if higher_is_better else -float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return float(value)
