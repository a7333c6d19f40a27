"""The search objective: one document of an lm-eval task, scored under a candidate chain.

Documents and their requests are built by lm-eval's own task API, exactly as
``lm_eval --tasks NAME`` builds them (same data, prompts, few-shot examples and generation
settings). For a chain, the document's requests run through the model as one batch, the
task's own filters and ``process_results`` turn the responses into metrics, and the chosen
metric becomes the score. So a chain found here scores the same when the task is re-evaluated
through ``lm_eval --model cola``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import PrefixCache
from lm_eval_cola.search.base import Trial
from lm_eval_cola.sources import doc_hash

#: The metric scored by default, per output type.
DEFAULT_METRICS = {
    "multiple_choice": "acc",
    "loglikelihood": "acc",
    "generate_until": "exact_match",
    "loglikelihood_rolling": "word_perplexity",
}
#: Metrics whose per-document value is 1 for a right answer and 0 for a wrong one.
BINARY_PREFIXES = ("acc", "exact_match", "em")


class ObjectiveError(ValueError):
    """The task cannot be searched as asked; the message says why and what to change."""


@dataclass
class Document:
    """One document of the task, with the requests lm-eval built for it."""

    doc_id: int
    doc: dict[str, Any]
    doc_hash: str
    instances: list[Instance]


def task_documents(task: Task, limit: int | None) -> list[Document]:
    """The task's evaluation documents and their requests, built by lm-eval itself."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list[Instance]] = defaultdict(list)
    for instance in task.instances:
        by_doc[instance.doc_id].append(instance)
    documents = []
    for doc_id, instances in sorted(by_doc.items()):
        instances.sort(key=lambda instance: instance.idx)
        doc = instances[0].doc
        documents.append(Document(doc_id, doc, doc_hash(doc), instances))
    return documents


def load_tasks(
    names: str,
    include_path: str | None = None,
    *,
    metric: str | None = None,
    filter_name: str | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    split: str | None = None,
) -> dict[str, Task]:
    """lm-eval's tasks (comma-separated ``names``), configured as ``lm_eval`` configures them;
    ``split`` replaces the split documents come from (e.g. train, to search chains for training
    a predictor). Raises before any compute for an unknown task, metric, filter or split."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include_path)
    wanted = [name for name in names.split(",") if name]
    unknown = [name for name in wanted if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: see `lm_eval ls tasks`")
    tasks = get_task_dict(wanted, manager)
    for task in tasks.values():
        check_task(task, metric, filter_name)
        if split is not None:
            _use_split(task, split)
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
        if max_gen_toks and task.get_config("output_type") == "generate_until":
            task.set_config("generation_kwargs", {"max_gen_toks": max_gen_toks}, update=True)
    return tasks


def _use_split(task: Task, split: str) -> None:
    splits = list(task.dataset or {})
    if split not in splits:
        raise ObjectiveError(
            f"task '{task.config.task}' has no split '{split}'; it has {', '.join(splits)}"
        )
    task.set_config(key="test_split", value=split)


def check_task(task: Task, metric: str | None, filter_name: str | None) -> tuple[str, str]:
    """The metric and filter to score with; raises before any compute if the task can't be
    searched (unknown metric or filter, or no gold answer to score against)."""
    name, output_type = task.config.task, task.get_config("output_type")
    metric = metric or DEFAULT_METRICS.get(output_type)
    metrics = list(task.higher_is_better())
    if metric not in metrics:
        raise ObjectiveError(
            f"task '{name}' has no metric '{metric}'; it reports {', '.join(metrics)}"
        )
    filters = [f.name for f in task._filters]
    filter_name = filter_name or filters[0]
    if filter_name not in filters:
        raise ObjectiveError(
            f"task '{name}' has no filter '{filter_name}'; it has {', '.join(filters)}"
        )
    if task.config.doc_to_target is None and output_type != "loglikelihood_rolling":
        raise ObjectiveError(
            f"task '{name}' has no gold answer (doc_to_target), so no chain can be scored"
        )
    return metric, filter_name


class Objective:
    """Scores chains on the documents of one task with one model (a ``cola`` backend)."""

    def __init__(
        self,
        lm,
        task: Task,
        metric: str | None = None,
        filter_name: str | None = None,
        prefix_cache_mb: float = 0.0,
    ) -> None:
        self.lm, self.task = lm, task
        self.output_type = task.get_config("output_type")
        self.metric, self.filter_name = check_task(task, metric, filter_name)
        self.higher_is_better = task.higher_is_better().get(self.metric, True)
        self.binary = self.metric.startswith(BINARY_PREFIXES)
        self.cache = PrefixCache(prefix_cache_mb) if prefix_cache_mb > 0 else None
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.model.forward).parameters

    def score(self, document: Document, chain: Chain, reference: float | None = None) -> Trial:
        """Run ``chain`` on the document; ``reference`` is the full model's score, for metrics
        that are not right/wrong (a chain is then "correct" when it scores at least as well)."""
        start, applications = time.perf_counter(), self.lm.executor.layer_applications
        metrics = self._metrics(document, chain)
        value = metrics[self.metric]
        score = _as_score(value, self.higher_is_better)
        # Without a reference (the full model itself, scored first) a graded metric counts as
        # correct; after that, a chain is correct when it does at least as well.
        correct = score >= 1.0 if self.binary else reference is None or score >= reference
        return Trial(
            chain=chain,
            score=score,
            correct=correct,
            metrics={k: _jsonable(v) for k, v in metrics.items()},
            layer_applications=self.lm.executor.layer_applications - applications,
            seconds=time.perf_counter() - start,
        )

    def _metrics(self, document: Document, chain: Chain) -> dict[str, Any]:
        by_type: dict[str, list[Instance]] = defaultdict(list)
        for instance in document.instances:
            instance.resps, instance.filtered_resps = [], {}
            by_type[instance.request_type].append(instance)
        for request_type, instances in by_type.items():
            scoring = request_type == "loglikelihood"
            requests = [i for i in instances for _ in range(i.repeats)]
            with (
                self.lm.executor.apply(chain, prefix_cache=self.cache if scoring else None),
                self._one_batch(requests),
                self._read_logits_only() if scoring else contextlib.nullcontext(),
            ):
                responses = getattr(HFLM, request_type)(self.lm, requests, disable_tqdm=True)
            for instance, response in zip(requests, responses, strict=True):
                instance.resps.append(response)
        for ensemble in self.task._filters:
            ensemble.apply(document.instances)
        results = [i.filtered_resps[self.filter_name] for i in document.instances]
        return self.task.process_results(document.doc, results)

    @contextlib.contextmanager
    def _read_logits_only(self) -> Iterator[None]:
        """Compute the LM head only at the positions HFLM reads logits from.

        HFLM right-pads a batch and reads each request's logits at positions ``inplen -
        contlen`` to ``inplen - 1``; it locates them from the end of what the model returns
        (the same arithmetic it uses for prompt-tuning's virtual tokens). So the model may
        return only the last positions, from the first one any request reads: HF's
        ``logits_to_keep``. The LM head over a large vocabulary costs as much as several
        decoder layers per position, and a document's prompt is most of its positions.
        """
        if not self._keeps_logits:
            yield
            return
        lm, first_read = self.lm, [0]
        tokens = lm._loglikelihood_tokens

        def note_first_read(requests, **kwargs):
            first_read[0] = min(_first_read_position(lm, c, t) for _, c, t in requests)
            return tokens(requests, **kwargs)

        def keep_last(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            return args, {**kwargs, "logits_to_keep": ids.shape[1] - first_read[0]}

        lm._loglikelihood_tokens = note_first_read
        handle = lm.model.register_forward_pre_hook(keep_last, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            del lm._loglikelihood_tokens

    @contextlib.contextmanager
    def _one_batch(self, requests: list[Instance]) -> Iterator[None]:
        """All of a document's requests in one batch, so every chain sees the same batches."""
        saved = self.lm.batch_size_per_gpu
        self.lm.batch_size_per_gpu = max(len(requests), 1)
        try:
            yield
        finally:
            self.lm.batch_size_per_gpu = saved


def _first_read_position(lm: HFLM, context: list[int], continuation: list[int]) -> int:
    """The first input position whose logits HFLM reads for this request (as it truncates a
    too long input from the left)."""
    input_length = min(len(context) + len(continuation), lm.max_length + 1) - 1
    return max(input_length - len(continuation), 0)


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
