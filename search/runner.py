"""A search run: every document of a task searched with one method, recorded in the store.

Documents are searched one at a time and each is written to the store (all its evaluations
and its done mark, in one transaction) as soon as it finishes. The run is named after
everything that defines it, so the same command finds its run again after a crash and goes on
with the documents not yet done; per-document seeds make the resumed run equal an uninterrupted
one. Shards (``--shard i/n``, or the ranks of ``torchrun``) split the documents of one run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lm_eval.utils import handle_non_serializable
from tqdm import tqdm

from lm_eval_cola.search.base import Trial, run_search, searcher_class
from lm_eval_cola.search.objective import Document, Objective, task_documents
from lm_eval_cola.search.space import ChainSpace
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo

logger = logging.getLogger("lm_eval.cola")


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides what a search finds (and so names its run)."""

    method: str
    budget: int
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    filter_name: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget {self.budget}: a search needs at least 1 evaluation")
        method = searcher_class(self.method)  # an unknown method fails here, before any compute
        try:  # and so do options it does not take
            method(ChainSpace(2), 1, 0, **self.method_options).close()
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


def shard_from_env() -> tuple[int, int]:
    """Under torchrun or accelerate launch, each rank searches its own share."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class SearchRun:
    """Searches the documents of one task with one model, writing to one store."""

    def __init__(
        self,
        lm,
        task,
        store: Store,
        settings: SearchSettings,
        prefix_cache_mb: float = 0.0,
        run_name: str | None = None,
    ) -> None:
        self.lm, self.task, self.store, self.settings = lm, task, store, settings
        self.space = ChainSpace(lm.executor.n_layers, **settings.space)
        self.objective = Objective(lm, task, settings.metric, settings.filter_name, prefix_cache_mb)
        self.documents = task_documents(task, settings.limit)
        self.run_name = run_name or self.default_name()

    def default_name(self) -> str:
        """The task, the method and a hash of the model and every setting but the limit: each
        document's search is the same whatever the limit, so a larger limit grows the run."""
        key = json.dumps(
            [self.lm.identity.fingerprint, self.task_info().config_hash, self._named_settings()],
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return f"{self.task.config.task}-{self.settings.method}-{digest}"

    def task_info(self) -> TaskInfo:
        return describe_task(self.task)

    def run(self, shard: tuple[int, int] = (0, 1)) -> int:
        """Search this shard's documents that the run has not finished; returns the run id."""
        index, count = shard
        model_id = self.store.model(self.lm.identity)
        task_id = self.store.task(self.task_info())
        ids = self.store.documents(task_id, [_document_info(d) for d in self.documents])
        run_id = self.store.start_run(model_id, task_id, self.run_info())
        done = self.store.finished_documents(run_id)
        mine = [d for d in self.documents[index::count] if ids[d.doc_hash] not in done]
        skipped = len(self.documents[index::count]) - len(mine)
        logger.info(
            "Run %d (%s): %d documents for shard %d/%d, %d already done",
            run_id, self.run_name, len(mine), index, count, skipped,
        )  # fmt: skip
        self.tally = tally = Tally()
        progress = tqdm(mine, desc=f"Searching {self.task.config.task} ({self.settings.method})")
        for document in progress:
            start = time.perf_counter()
            trials = self.search(document)
            evaluations = [_evaluation_info(t) for t in trials]
            seconds = time.perf_counter() - start
            self.store.record_document(run_id, ids[document.doc_hash], evaluations, seconds)
            tally.add(trials, self.space.n_layers)
            progress.set_postfix(tally.postfix())
        self.store.finish_run_if_done(run_id)
        return run_id

    def _named_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.settings).items() if k != "limit"}

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

    def search(self, document: Document) -> list[Trial]:
        """All chains the method evaluates on the document; the first is the full model."""
        if self.objective.cache is not None:
            self.objective.cache.clear()
        searcher = searcher_class(self.settings.method)(
            self.space,
            self.settings.budget,
            _document_seed(self.settings.seed, document.doc_hash),
            storage=self.store.url_for_studies(),
            study_name=f"{self.run_name}-{document.doc_hash[:16]}",
            **self.settings.method_options,
        )
        reference: list[float] = []

        def evaluate(chain):
            trial = self.objective.score(document, chain, reference[0] if reference else None)
            reference.append(trial.score)
            return trial

        return run_search(searcher, evaluate)


def describe_task(task) -> TaskInfo:
    """The task as the store records it; ``config_hash`` changes with any prompt, split or
    metric change, so chains are never matched to documents of a changed task."""
    config = task.dump_config()
    return TaskInfo(
        name=task.config.task,
        version=str((config.get("metadata") or {}).get("version", task.VERSION)),
        config_hash=hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()
        ).hexdigest(),
        split=task.config.test_split or task.config.validation_split,
        output_type=task.get_config("output_type"),
    )


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
        seconds=trial.seconds,
    )
