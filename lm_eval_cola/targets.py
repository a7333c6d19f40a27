"""What a search is rewarded by: the gold answer, or a decoy, a designated wrong answer.

An oracle search asks whether some chain gives the gold answer. Run with ``--target decoy``,
the same search (same space, budget and seed) is rewarded by an answer known to be wrong;
how often it reaches that answer says how much of the oracle a lottery over answers would
give. The decoy of a document is fixed before any compute and never equals its gold answer:

- multiple choice: the option after the gold one, cyclically (the last option's decoy is the
  first);
- a generated letter among the prompt's lettered options (lines such as ``B. text``): the
  letter after the gold one among them, cyclically;
- a generated number: the gold number plus one (``42`` -> ``43``, ``-1`` -> ``0``,
  ``2.5`` -> ``3.5``);
- a generation task whose target indexes ``doc_to_choice``: the next index, cyclically.

The decoy is judged by the task's own ``process_results``, filters and metric options,
through :func:`judged_by`: a view of the task whose ``doc_to_target`` returns the decoy.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from lm_eval_cola.errors import ColaError
from lm_eval_cola.tasks import doc_hash

#: What a search can be rewarded by.
TARGETS = ("gold", "decoy")
#: An option line of a lettered prompt: ``A. text``, ``(B) text``, ``C) text``.
_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class TargetError(ColaError, ValueError):
    """The task has no decoy answer; the message says which kinds of task do."""


def decoy(task, doc: dict) -> int | str:
    """The document's decoy answer, in the form ``doc_to_target`` gives its gold one."""
    gold = task.doc_to_target(doc)
    kind = task.get_config("output_type")
    if kind == "multiple_choice" or (kind == "generate_until" and _indexes_choices(task)):
        return _next_option(task, doc, gold)
    if kind == "generate_until":
        text = str(gold).strip()
        letters = _OPTION.findall(task.doc_to_text(doc))
        if text in letters and len(letters) > 1:
            return letters[(letters.index(text) + 1) % len(letters)]
        number = _number(text)
        if number is not None:
            return _format(number + 1)
    raise TargetError(
        f"task {task.config.task}: --target decoy needs a multiple-choice task, or a generated "
        f"letter among lettered options or a generated number; the target {gold!r} is none "
        "of them"
    )


def check_decoys(task, documents) -> None:
    """Every document has a decoy, or nothing runs (raises on the first that has none)."""
    for document in documents:
        decoy(task, document.doc)


def judged_by(task, target: str):
    """``task`` itself for ``gold``; for ``decoy``, a copy whose every document's target is
    its decoy, so that the task's own ``process_results`` scores the decoy."""
    if target == "gold":
        return task
    if target != "decoy":
        raise TargetError(f"--target {target}: choose one of {', '.join(TARGETS)}")
    view = copy.copy(task)
    decoys: dict[str, int | str] = {}

    def doc_to_target(doc: dict, *_args: Any, **_kwargs: Any) -> int | str:
        key = doc_hash(doc)
        if key not in decoys:
            decoys[key] = decoy(task, doc)
        return decoys[key]

    view.doc_to_target = doc_to_target
    return view


def _indexes_choices(task) -> bool:
    return task.config.doc_to_choice is not None


def _next_option(task, doc: dict, gold: Any) -> int:
    choices = task.doc_to_choice(doc)
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or len(choices) < 2:
        raise TargetError(
            f"task {task.config.task}: --target decoy needs one gold option among at least two; "
            f"the target is {gold!r} of {len(choices)} options"
        )
    return (gold + 1) % len(choices)


def _number(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").strip()
    if not _NUMBER.match(cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def _format(number: Decimal) -> str:
    return str(number.quantize(1)) if number == number.to_integral_value() else str(number)


def shuffled(doc: dict, shift: int) -> dict:
    """The document with its options rotated ``shift`` places (option ``i`` moves to
    ``i + shift``) and its gold label moved with the gold option's text: the same question
    whose right answer sits elsewhere. ARC's layout (``choices.text``, ``choices.label``,
    ``answerKey``) and MMLU's (``choices`` a list, ``answer`` an index) are understood."""
    choices = doc.get("choices")
    if isinstance(choices, dict) and "answerKey" in doc:
        texts, labels = choices["text"], choices["label"]
        moved = _rotated(texts, shift)
        answer = labels[(labels.index(doc["answerKey"]) + shift) % len(labels)]
        return {**doc, "choices": {**choices, "text": moved}, "answerKey": answer}
    if isinstance(choices, list) and isinstance(doc.get("answer"), int):
        return {
            **doc,
            "choices": _rotated(choices, shift),
            "answer": (doc["answer"] + shift) % len(choices),
        }
    raise TargetError(
        "option shuffle needs ARC-style documents (choices.text, choices.label, answerKey) or "
        "MMLU-style ones (a list of choices, an answer index)"
    )


def _rotated(items: list, shift: int) -> list:
    return [items[(i - shift) % len(items)] for i in range(len(items))]
