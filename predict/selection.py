"""Hyper-parameters chosen on a validation split of the training documents, never on test.

A candidate predictor's choice for a document is one of the score table's columns, so its
validation accuracy is read from the table with no model run: train on the rest of the
training documents with each setting, count the validation documents whose chosen candidate
is correct, keep the best setting (the first among equals), and train again on every training
document with it. Predictors that compose chains outside the table (``program``, ``router``)
pick their epoch on held-out training documents instead (:func:`fit_network`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.predict.predictors import CandidatePredictor, train
from lm_eval_cola.predict.training_set import TrainingSet

logger = logging.getLogger("lm_eval.cola")

#: the settings tried per kind
GRIDS: dict[str, list[dict[str, Any]]] = {
    "knn": [{"k": k} for k in (1, 3, 5, 10, 20, 50)],
    "network": [{"width": w, "epochs": e} for w in (32, 64, 128) for e in (20, 40)],
}


def meaningful(kind: str, grid: list[dict[str, Any]], documents: int) -> list[dict[str, Any]]:
    """The settings that can mean what they say on ``documents`` training documents (knn's k
    at most that many; at least the smallest k), with a note of those skipped."""
    kept = [o for o in grid if o.get("k", 0) <= documents] or grid[:1]
    skipped = [describe(o) for o in grid if o not in kept]
    if skipped:
        logger.info(
            "%s: skipped %s: more neighbours than the %d documents it is fitted on",
            kind, ", ".join(skipped), documents,
        )  # fmt: skip
    return kept


def describe(options: dict[str, Any]) -> str:
    """``k=5`` or ``width=64,epochs=20``: a setting as the command line prints it."""
    return ",".join(f"{k}={v}" for k, v in options.items())


def subset(data: TrainingSet, rows: list[int]) -> TrainingSet:
    """The training set restricted to the documents ``rows``."""
    return dataclasses.replace(
        data,
        doc_hashes=[data.doc_hashes[i] for i in rows],
        scores=data.scores[rows],
        correct=data.correct[rows],
        states=_rows(data.states, rows),
        routes=_rows(data.routes, rows),
    )


def _rows(values: list | None, rows: list[int]) -> list | None:
    return None if values is None else [values[i] for i in rows]


def split(n: int, share: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, validation) document indices, seeded."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(share * n))
    return sorted(order[held:]), sorted(order[:held])


def validation_accuracy(predictor: CandidatePredictor, data: TrainingSet) -> float:
    """The share of ``data``'s documents whose chosen candidate is correct (from the table)."""
    states = data.states or [None] * len(data.doc_hashes)  # None: a kind that ignores them
    right = [bool(data.correct[i, predictor.choose(s)]) for i, s in enumerate(states)]
    return sum(right) / len(right)


def select(
    kind: str, data: TrainingSet, model: ModelIdentity, share: float = 0.2, seed: int = 0
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """The best setting of ``kind`` on a validation split, and every setting's accuracy."""
    fit_rows, held_rows = split(len(data.doc_hashes), share, seed)
    fit_on, held = subset(data, fit_rows), subset(data, held_rows)
    tried = [
        (options, validation_accuracy(train(kind, fit_on, model, **options), held))
        for options in meaningful(kind, GRIDS[kind], len(fit_rows))
    ]
    best = max(tried, key=lambda item: item[1])  # max keeps the first among equals
    return best[0], tried
