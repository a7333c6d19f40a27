"""lm-eval tasks as this package reads them: loaded, checked, and split into documents.

The first step of the flow (task -> requests -> chain source -> executor -> results -> store).
Documents and their requests are built by lm-eval's own task API, exactly as
``lm_eval --tasks NAME`` builds them (same data, prompts, few-shot examples and generation
settings), and a document is known by the hash lm-eval logs for it (``doc_hash``), so a chain
is only ever applied to the document it was made for.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lm_eval.api.instance import Instance
from lm_eval.api.task import Task

from lm_eval_cola.errors import ColaError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

#: The metric scored by default, per output type.
DEFAULT_METRICS = {
    "multiple_choice": "acc",
    "loglikelihood": "acc",
    "generate_until": "exact_match",
    "loglikelihood_rolling": "word_perplexity",
}


class TaskError(ColaError, ValueError):
    """The task cannot be used as asked; the message says why and what to change."""


@dataclass
class Document:
    """One document of a task, with the requests lm-eval built for it."""

    doc_id: int
    doc: dict[str, Any]
    doc_hash: str
    instances: list[Instance]


def doc_hash(doc: Mapping) -> str:
    """The hash lm-eval logs as ``doc_hash`` for a document (same serialisation, same digest)."""
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def documents_of(task: Task, docs: list[dict]) -> list[Document]:
    """Documents whose requests lm-eval builds from ``docs`` instead of the task's own split
    (the same questions with their options reordered, say): a copy of the task whose test
    split is ``docs``."""
    view = copy.copy(task)
    view.has_test_docs = lambda: True
    view.test_docs = lambda: docs
    return task_documents(view, None)


@dataclass(frozen=True)
class TaskSpec:
    """How one lm-eval task is configured for scoring chains: which documents (``split``, the
    task's evaluation split when ``None``), how a response is judged (``metric``,
    ``filter_name``: the task's first filter when ``None``) and how the prompt and the answer
    are built (``num_fewshot``, ``max_gen_toks``). A run records it and re-loads it whole
    (:meth:`settings`, :meth:`stored`), so a task is read back exactly as it was searched."""

    name: str
    split: str | None = None
    metric: str | None = None
    filter_name: str | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None

    #: What a run's settings record of the spec; the store's task row holds name and split.
    #: (The layout of every release so far, so that their runs resume under the same names.)
    SETTINGS: ClassVar[tuple[str, ...]] = ("metric", "filter_name", "num_fewshot", "max_gen_toks")

    @classmethod
    def many(cls, names: str, **fields: Any) -> list[TaskSpec]:
        """One spec per comma-separated task name, the same ``fields`` for each."""
        return [cls(name, **fields) for name in names.split(",") if name]

    @classmethod
    def stored(cls, name: str, split: str | None, settings: Mapping[str, Any]) -> TaskSpec:
        """The spec a run recorded: its task's name and split, and its settings."""
        return cls(name, split, **{key: settings.get(key) for key in cls.SETTINGS})

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.SETTINGS}

    def load(self, include_path: str | None = None) -> Task:
        """The task, configured as ``lm_eval`` configures it and as this spec says."""
        return load_specs([self], include_path)[self.name]


def load_tasks(names: str, include_path: str | None = None, **fields: Any) -> dict[str, Task]:
    """lm-eval's tasks (comma-separated ``names``), each configured by ``fields`` (those of
    :class:`TaskSpec`)."""
    return load_specs(TaskSpec.many(names, **fields), include_path)


@functools.cache
def task_index(include_path: str | None = None) -> TaskManager:
    """lm-eval's task index, with ``include_path``'s tasks: built once a process, since it
    parses every task YAML lm-eval ships (about 15 s on a 2-core CPU)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def load_specs(specs: list[TaskSpec], include_path: str | None = None) -> dict[str, Task]:
    """lm-eval's tasks configured as ``lm_eval`` configures them and as their specs say (a
    ``split`` replaces the one documents come from: e.g. train, to search chains for training
    a predictor). Raises before any compute for an unknown task, metric, filter or split."""
    from lm_eval.tasks import get_task_dict

    manager = task_index(include_path)
    unknown = [spec.name for spec in specs if spec.name not in manager.all_tasks]
    if unknown:
        raise TaskError(f"unknown task(s) {', '.join(unknown)}: see `lm_eval ls tasks`")
    tasks = get_task_dict([spec.name for spec in specs], manager)
    for spec in specs:
        if not isinstance(tasks.get(spec.name), Task):
            raise TaskError(f"'{spec.name}' is a group of tasks: name its tasks one by one")
        _configure(tasks[spec.name], spec)
    return tasks


def _configure(task: Task, spec: TaskSpec) -> None:
    check_task(task, spec.metric, spec.filter_name)
    if spec.split is not None:
        _use_split(task, spec.split)
    if spec.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    if spec.max_gen_toks and task.get_config("output_type") == "generate_until":
        task.set_config("generation_kwargs", {"max_gen_toks": spec.max_gen_toks}, update=True)


def evaluation_split(task: Task) -> str | None:
    """The split a task's documents come from (its test split, else its validation split)."""
    return task.config.test_split or task.config.validation_split


def _use_split(task: Task, split: str) -> None:
    if split == evaluation_split(task):  # already so: the configuration stays as it is
        return
    splits = list(task.dataset or {})
    if split not in splits:
        raise TaskError(
            f"task '{task.config.task}' has no split '{split}'; it has {', '.join(splits)}"
        )
    task.set_config(key="test_split", value=split)


def check_task(task: Task, metric: str | None, filter_name: str | None) -> tuple[str, str]:
    """The metric and filter to score with; raises before any compute if the task can't be
    scored per document (unknown metric or filter, or no gold answer to score against)."""
    name, output_type = task.config.task, task.get_config("output_type")
    metric = metric or DEFAULT_METRICS.get(output_type)
    metrics = list(task.higher_is_better())
    if metric not in metrics:
        raise TaskError(f"task '{name}' has no metric '{metric}'; it reports {', '.join(metrics)}")
    filters = [f.name for f in filters_of(task)]
    filter_name = filter_name or filters[0]
    if filter_name not in filters:
        raise TaskError(f"task '{name}' has no filter '{filter_name}'; it has {', '.join(filters)}")
    if task.config.doc_to_target is None and output_type != "loglikelihood_rolling":
        raise TaskError(
            f"task '{name}' has no gold answer (doc_to_target), so no chain can be scored"
        )
    return metric, filter_name


def filters_of(task: Task) -> list:
    """The task's filter ensembles, as lm-eval built them from its configuration. lm-eval's
    public ``Task.apply_filters`` filters every instance of the task, also those of documents
    not yet answered (which fails); a chain's score needs its own document's alone."""
    return task._filters


def config_hash(task: Task) -> str:
    """Changes with any prompt, split or metric change, so chains are never matched to
    documents of a changed task."""
    config = task.dump_config()
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def task_version(task: Task) -> str:
    config = task.dump_config()
    return str((config.get("metadata") or {}).get("version", task.VERSION))
