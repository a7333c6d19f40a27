"""A search run: every document of a task searched with one method, recorded in the store.

Up to ``parallel_docs`` documents are searched at once: each document's searcher proposes a
chain, and the proposals in flight are scored together
(:class:`~lm_eval_cola.scoring.ScoringStream`: a forward pass for all of them, or, for
generated answers, decoding steps shared as they come). Each
document is written to the store (all its evaluations and its done mark, in one transaction)
as soon as its search ends, and another takes its place. The run is named after everything
that defines it, so the same command finds its run again after a crash and goes on with the
documents not yet done; per-document seeds make the resumed run equal an uninterrupted one,
whatever ``parallel_docs``. Shards (``--shard i/n``, or the ranks of ``torchrun``) split the
documents of one run across machines or GPUs, workers (``--workers``, search/workers.py) across
a CPU's cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lm_eval.utils import handle_non_serializable
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.fingerprint import reregister_hint
from lm_eval_cola.scoring import Objective, Proposal, ScoringStream, Trial
from lm_eval_cola.search.base import LOOK_AHEAD, DocumentSearch, searcher_class
from lm_eval_cola.search.space import ChainSpace
from lm_eval_cola.search.workers import check_workers, search_in_workers
from lm_eval_cola.store.store import (
    DocumentInfo,
    EvaluationInfo,
    RunInfo,
    Store,
    TaskInfo,
    default_run_name,
)
from lm_eval_cola.targets import TARGETS, check_decoys

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM
from lm_eval_cola.tasks import (
    Document,
    TaskSpec,
    config_hash,
    evaluation_split,
    task_documents,
    task_version,
)

logger = logging.getLogger("lm_eval.cola")
#: How a search's generations decode (:attr:`SearchSettings.decoding`).
DECODINGS = ("batch_invariant", "hf")


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides what a search finds (and so names its run)."""

    method: str
    budget: int
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    #: how the task is configured (``None``: its defaults)
    task: TaskSpec | None = None
    limit: int | None = None
    #: what the search is rewarded by: the gold answer or a decoy (targets.py)
    target: str = "gold"
    #: the gold run an unguided baseline run is a control of (``cola controls``)
    control_of: str | None = None
    #: how generation decodes: ``batch_invariant`` (mixed-chain batches, the default for new
    #: runs) or ``hf`` (HF's own ``generate`` a chain at a time, as runs before it did); the
    #: mode only matters to generation tasks, and only they record it
    decoding: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"--target {self.target}: choose one of {', '.join(TARGETS)}")
        if self.budget < 1:
            raise ValueError(f"budget {self.budget}: a search needs at least 1 evaluation")
        if self.decoding not in (None, *DECODINGS):
            raise ValueError(f"--decoding {self.decoding}: choose one of {', '.join(DECODINGS)}")
        method = searcher_class(self.method)  # an unknown method fails here, before any compute
        try:  # and so do options it does not take
            method(ChainSpace(2), 1, 0, **self.method_options)
        except TypeError as err:
            raise ValueError(f"method {self.method}: {err}") from None


@dataclass
class Tally:
    """Live counts for the progress bar: the paper's two headline questions."""

    documents: int = 0
    evaluations: int = 0
    originally_correct: int = 0
    shortened: int = 0
    originally_wrong: int = 0
    corrected: int = 0

    def add(self, trials: list[Trial], n_layers: int) -> None:
        original, *_ = trials
        self.documents += 1
        self.evaluations += len(trials)
        if original.correct:
            self.originally_correct += 1
            self.shortened += any(t.correct and t.length < n_layers for t in trials)
        else:
            self.originally_wrong += 1
            self.corrected += any(t.correct for t in trials)

    def __str__(self) -> str:
        return (
            f"{self.documents} documents, {self.evaluations} evaluations; originally correct "
            f"with a shorter correct chain: {self.shortened}/{self.originally_correct}; "
            f"originally wrong and corrected: {self.corrected}/{self.originally_wrong}"
        )

    def postfix(self) -> dict[str, str]:
        return {
            "shortened": f"{self.shortened}/{self.originally_correct}",
            "corrected": f"{self.corrected}/{self.originally_wrong}",
        }


class SearchProgress:
    """A bar of evaluations across every document in flight, so its rate and ETA are true from
    the first pass over the model (documents finish together, late, when searched in
    parallel); documents done and the tally beside it."""

    def __init__(self, documents: int, budget: int, what: str) -> None:
        self.documents, self.done, self.budget = documents, 0, budget
        self.bar = tqdm(total=documents * budget, desc=f"Searching {what}", unit="eval")
        self.bar.set_postfix(self._postfix())

    def scored(self, evaluations: int) -> None:
        self.bar.update(evaluations)

    def finished(self, evaluations: int, tally: Tally) -> None:
        """A document is done; one that stopped short of its budget shrinks the total."""
        self.done += 1
        self.bar.total -= self.budget - evaluations
        self.bar.set_postfix(self._postfix(tally))

    def _postfix(self, tally: Tally | None = None) -> dict[str, str]:
        return {"documents": f"{self.done}/{self.documents}", **(tally.postfix() if tally else {})}

    def close(self) -> None:
        self.bar.close()


def shard_of(text: str | None) -> tuple[int, int]:
    """The shard ``--shard i/n`` names; without one, under torchrun or accelerate launch, each
    rank searches its own share."""
    if not text:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"--shard {text}: write i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(index), int(count)


def check_pace(parallel_docs: int, look_ahead: int) -> None:
    """Refuse, before any compute, documents at once or chains ahead a search cannot take."""
    if parallel_docs < 1:
        raise ValueError(f"--parallel_docs {parallel_docs}: search at least 1 document at once")
    if look_ahead < 0:
        raise ValueError(f"--look_ahead {look_ahead}: decode 0 or more chains ahead")


@dataclass
class _Active:
    """A document whose search is under way."""

    document: Document
    search: DocumentSearch
    #: chains submitted ahead of their turn (:meth:`SearchRun._look_ahead`): ``None`` while
    #: scored, then the trial, until the search asks for them
    ahead: dict[Chain, Trial | None] = field(default_factory=dict)
    #: the chains the search will ask after :attr:`planned_after` if it and each of them
    #: score :attr:`guess`
    plan: list[Chain] = field(default_factory=list)
    planned_after: Chain | None = None
    guess: float = 0.0
    #: whether :attr:`plan` went to the end of the search when it was made
    to_the_end: bool = False

    def chain_ahead(self, count: int) -> Chain | None:
        """The next of the ``count`` chains the search will ask after the pending one if they
        all score as guessed, not yet in flight or scored; ``None`` when all are.

        A plan costs a hypothetical search step per chain (an MCTS of budget 200 some
        milliseconds each), so it is made twice as long as a document's chains ahead and made
        again only where the search has left it or its rest is all in flight: while the
        guesses come true, the rest of the last plan is still what the search will ask."""
        if not self._follow_plan() or self._spent(count):
            self._make_plan(count)
        return next((c for c in self.plan[:count] if c not in self.ahead), None)

    def _spent(self, count: int) -> bool:
        """Whether following has left the plan shorter than ``count`` (a new one is ``2 *
        count`` long unless the search ends sooner) and all of it is in flight or scored."""
        short = not self.to_the_end and len(self.plan) < count
        return short and all(c in self.ahead for c in self.plan)

    def _follow_plan(self) -> bool:
        """Move the plan on to the pending chain if the chains recorded since it was made are
        the ones it named, each scored as guessed; whether the plan still holds."""
        pending = self.search.pending
        if pending == self.planned_after:
            return True
        if pending not in self.plan:
            return False
        passed = [self.planned_after, *self.plan[: self.plan.index(pending)]]
        recent = list(self.search.trials.values())[-len(passed) :]
        if [t.chain for t in recent] != passed or any(t.score != self.guess for t in recent):
            return False
        self.plan, self.planned_after = self.plan[len(passed) :], pending
        return True

    def _make_plan(self, count: int) -> None:
        self.guess = _likely_score(self.search.trials.values())
        self.plan = self.search.chains_ahead(self.guess, 2 * count)
        self.to_the_end = len(self.plan) < 2 * count
        self.planned_after = self.search.pending


class SearchRun:
    """Searches the documents of one task with one model, writing to one store."""

    def __init__(
        self,
        lm: ChainLM,
        task,
        store: Store,
        settings: SearchSettings,
        prefix_cache_mb: float = 0.0,
        run_name: str | None = None,
        parallel_docs: int = 1,
        workers: int = 1,
        look_ahead: int = LOOK_AHEAD,
    ) -> None:
        check_pace(parallel_docs, look_ahead)
        check_workers(workers, lm.executor.model.device.type)
        self.lm, self.task, self.store, self.settings = lm, task, store, settings
        self.spec = settings.task or TaskSpec(task.config.task)
        if self.spec.name != task.config.task:
            raise ValueError(f"settings of task '{self.spec.name}' for task '{task.config.task}'")
        self.space = ChainSpace(lm.executor.n_layers, **settings.space)
        self.decoding = decoding_of(task, settings.decoding)
        self.objective = Objective(
            lm, task, self.spec, prefix_cache_mb, settings.target,
            batch_invariant=self.decoding == "batch_invariant",
        )  # fmt: skip
        self.documents = task_documents(task, settings.limit)
        if settings.target == "decoy":
            check_decoys(task, self.documents)
        self.run_name = run_name or self.default_name()
        self.parallel_docs, self.workers = parallel_docs, workers
        #: chains of a document scored ahead of the pending one, on a guess of its score
        #: (:meth:`_look_ahead`; 0: one chain of a document at a time, as the naive path)
        self.look_ahead = look_ahead

    def default_name(self) -> str:
        return default_run_name(
            self.task.config.task,
            self.settings.method,
            self.lm.identity.fingerprint,
            self.task_info().config_hash,
            self._named_settings(),
        )

    def task_info(self) -> TaskInfo:
        return describe_task(self.task)

    def run(self, shard: tuple[int, int] = (0, 1)) -> int:
        """Search this shard's documents that the run has not finished; returns the run id."""
        index, count = shard
        self._warn_of_sampled_runs()
        self._refuse_other_decoding()
        model_id = self.store.model(self.lm.identity)
        task_id = self.store.task(self.task_info())
        ids = self.store.documents(task_id, [_document_info(d) for d in self.documents])
        run_id = self.store.start_run(model_id, task_id, self.run_info())
        done = self.store.finished_documents(run_id)
        mine = [d for d in self.documents[index::count] if ids[d.doc_hash] not in done]
        skipped = len(self.documents[index::count]) - len(mine)
        if self.parallel_docs > 1:  # documents searched together pad each other less
            mine.sort(key=lambda document: -(self.objective.row_tokens(document) or 0))
        logger.info(
            "Run %d (%s): %d documents for shard %d/%d, %d already done, %d at a time in %d "
            "process(es)",
            run_id, self.run_name, len(mine), index, count, skipped, self.parallel_docs,
            self.workers,
        )  # fmt: skip
        self.tally = tally = Tally()
        progress = SearchProgress(
            len(mine), self.settings.budget, f"{self.task.config.task} ({self.settings.method})"
        )
        searcher_class(self.settings.method).prepare_archive(self.store.url_for_studies())
        workers = min(self.workers, len(mine))
        if workers > 1:
            found = search_in_workers(self, mine, workers, progress.scored)
        else:
            found = self.searches(mine, progress.scored)
        for document, trials in found:
            evaluations = [_evaluation_info(t) for t in trials]
            seconds = sum(t.seconds for t in trials)
            limit = self._token_layer_limit(document, trials)
            self.store.record_document(run_id, ids[document.doc_hash], evaluations, seconds, limit)
            tally.add(trials, self.space.n_layers)
            progress.finished(len(trials), tally)
        progress.close()
        self.store.finish_run_if_done(run_id)
        return run_id

    def _warn_of_sampled_runs(self) -> None:
        stale = self.store.sampled_runs(self.lm.identity.name)
        if stale:
            logger.warning(
                "%s holds %d run(s) of %s that this search will not resume: %s",
                self.store, stale, self.lm.identity.name,
                reregister_hint(f"--store {self.store.url}"),
            )  # fmt: skip

    def _refuse_other_decoding(self) -> None:
        """A run grows only in the decoding mode it was searched in (its answers depend on it)."""
        settings = self.store.run_settings(self.run_name)
        if settings is not None and settings.get("decoding") != self.decoding:
            stored = settings.get("decoding") or "hf"
            raise ValueError(
                f"run '{self.run_name}' in {self.store} was searched with --decoding {stored}; "
                f"resume it with --decoding {stored}, or give this search another --run_name"
            )

    def searches(
        self, documents: list[Document], scored: Callable[[int], None] = lambda n: None
    ) -> Iterator[tuple[Document, list[Trial]]]:
        """Search the documents, ``parallel_docs`` at a time; yields each as it finishes with
        all the chains its method evaluated (the first is the full model). A document asks for
        its next chain as soon as its last one is scored
        (:class:`~lm_eval_cola.scoring.ScoringStream`: at once for a generated answer, else
        when every document's is), and another document takes its place as soon as its search
        ends; the chains the method will ask next if the pending one scores as most of the
        document's did are scored beside it (:meth:`_look_ahead`). ``scored`` hears of every
        chain recorded (not of a failed guess's)."""
        waiting, stream = iter(documents), self.objective.stream()
        ahead = self.look_ahead if self.objective.binary and stream.overlaps else 0
        ready: list[_Active] = []
        under_way = 0
        while True:
            fresh: set[int] = set()  # searches whose pending chain this step will start
            while ready or under_way < self.parallel_docs:
                if under_way < self.parallel_docs:
                    document = next(waiting, None)
                    if document is not None:
                        ready.append(_Active(document, DocumentSearch(self._searcher(document))))
                        under_way += 1
                if not ready:
                    break
                search = ready.pop(0)
                chain = search.search.next_chain()
                if chain is None:
                    under_way -= 1
                    self._archive(search)
                    yield search.document, list(search.search.trials.values())
                elif chain not in search.ahead:
                    stream.submit(Proposal(search.document, chain), search)
                    fresh.add(id(search))
                elif (trial := search.ahead.pop(chain)) is not None:  # scored already
                    search.search.record(trial)
                    scored(1)
                    ready.append(search)
            if not stream.pending:
                return
            if ahead:
                self._look_ahead(stream, ahead, fresh)
            recorded = 0
            for search, trial in stream.finished():
                if trial.chain == search.search.pending:
                    search.search.record(trial)
                    ready.append(search)
                    recorded += 1
                else:
                    search.ahead[trial.chain] = trial
            scored(recorded)

    @staticmethod
    def _look_ahead(stream: ScoringStream, count: int, fresh: set[int]) -> None:
        """Submit, beside each pending chain, the next of the ``count`` chains its search will
        ask after it if it and each of them score what most of the document's chains scored
        (:meth:`DocumentSearch.chains_ahead`): replayed on the paper's runs, that guess names
        the next chain for 97% of an MCTS's evaluations, and a random walk or a menu asks
        the same chains whatever the scores. So calls carry several rows per document, in
        rows the decoding step would leave empty (:attr:`ScoringStream.room`: a chain ahead
        never delays another document's pending one). One a decoding step, none beside a
        pending chain the step starts (``fresh``): a chain ahead starts a step behind the one
        before it and resumes from what that one put in the prefix cache rather than computing
        their shared prefix beside it. A chain of a failed guess is scored all the same, kept
        in case it is asked later."""
        searches = {id(tag): tag for _, tag, _ in stream.pending.values()}
        for key, search in searches.items():
            pending = search.search.pending
            if stream.room <= 0:
                return
            if pending is None or key in fresh:
                continue
            if (chain := search.chain_ahead(count)) is not None:
                search.ahead[chain] = None
                stream.submit(Proposal(search.document, chain), search)

    def _searcher(self, document: Document):
        seed = _document_seed(self.settings.seed, document.doc_hash)
        method = searcher_class(self.settings.method)
        return method(self.space, self.settings.budget, seed, **self.settings.method_options)

    def _archive(self, search: _Active) -> None:
        name = f"{self.run_name}-{search.document.doc_hash[:16]}"
        search.search.searcher.archive(self.store.url_for_studies(), name)

    def _token_layer_limit(self, document: Document, trials: list[Trial]) -> int | None:
        """The physical limit of the document's search: each distinct chain prefix evaluated,
        once, over the document's distinct token positions (a loglikelihood task's packed row,
        a generation task's prompt), plus, for generation, each distinct (chain prefix, token
        history) of a decoding step once: one token a step."""
        tokens = self.objective.row_tokens(document)
        if tokens is None:
            return None
        decoding = {
            (step, prefix)
            for trial in trials
            for step in trial.decode_steps
            for prefix in prefixes(trial.chain)
        }
        return tokens * distinct_prefixes(t.chain for t in trials) + len(decoding)

    def _named_settings(self) -> dict[str, Any]:
        """What names the run: every setting but the limit (a larger one grows the run), the
        task's by their fields (its name and split name the task), and not the defaults that
        runs searched before them did not record (a gold target, no control, HF's decoding or
        none: a task that does not generate)."""
        settings = {**asdict(self.settings), **self.spec.settings()}
        del settings["limit"], settings["task"]
        settings["decoding"] = self.decoding
        for name, default in (("target", "gold"), ("control_of", None), ("decoding", None)):
            if settings[name] == default:
                del settings[name]
        return settings

    def run_info(self) -> RunInfo:
        settings = self._named_settings()
        return RunInfo(
            method=self.settings.method,
            budget=self.settings.budget,
            seed=self.settings.seed,
            n_documents=len(self.documents),
            space=self.space.describe(),
            settings={k: v for k, v in settings.items() if k not in ("method", "budget", "seed")},
            name=self.run_name,
        )


def decoding_of(task, asked: str | None) -> str | None:
    """How a search of ``task`` decodes: as asked, batch-invariant by default; ``None`` for a
    task that generates nothing. HF's decoding is recorded as ``None`` too, as every run
    before the option recorded it (so those runs keep their names and resume)."""
    if task.get_config("output_type") != "generate_until":
        return None
    decoding = asked or "batch_invariant"
    return None if decoding == "hf" else decoding


def prefixes(chain: Chain) -> list[tuple[int, ...]]:
    """The chain's prefixes, of every length."""
    return [chain.layers[:end] for end in range(1, len(chain) + 1)]


def distinct_prefixes(chains: Iterable[Chain]) -> int:
    """How many different chain prefixes (of any length) the chains have."""
    return len({prefix for chain in chains for prefix in prefixes(chain)})


def describe_task(task) -> TaskInfo:
    """The task as the store records it (see :func:`lm_eval_cola.tasks.config_hash`)."""
    return TaskInfo(
        name=task.config.task,
        version=task_version(task),
        config_hash=config_hash(task),
        split=evaluation_split(task),
        output_type=task.get_config("output_type"),
    )


def _likely_score(trials: Iterable[Trial]) -> float:
    """The score most of a document's chains got (0 or 1; a tie goes to the latest, none
    yet to 0): what :meth:`SearchRun._look_ahead` guesses the pending chain will score."""
    scores = [trial.score for trial in trials]
    if not scores:
        return 0.0
    return max((0.0, 1.0), key=lambda s: (scores.count(s), s == scores[-1]))


def _document_seed(seed: int, doc_hash: str) -> int:
    return int(hashlib.sha256(f"{seed}:{doc_hash}".encode()).hexdigest()[:8], 16)


def _document_info(document: Document) -> DocumentInfo:
    fields = json.loads(json.dumps(document.doc, default=handle_non_serializable))
    return DocumentInfo(document.doc_hash, document.doc_id, fields)


def _evaluation_info(trial: Trial) -> EvaluationInfo:
    return EvaluationInfo(
        chain=str(trial.chain),
        length=trial.length,
        metrics=trial.metrics,
        score=trial.score,
        correct=trial.correct,
        layer_applications=trial.layer_applications,
        token_layer_applications=trial.token_layer_applications,
        seconds=trial.seconds,
        response=trial.response,
    )
