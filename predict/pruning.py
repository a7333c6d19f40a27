"""Static chains shorter than the model: layers removed one at a time, greedily.

A predictor held to a depth budget (``--max_depth``, e.g. the issue's 85% of the model's
layers) can only choose candidates that short. The per-document search rarely makes them: its
chains are mostly one or two edits from the full model, and the chains right on the most
documents are the longest. So the training set can add a path of pruned chains: the full model
less one layer, less two, ... down to ``min_layers``.

Each step removes the layer whose removal keeps the best mean score on the pruning documents.
Trying every layer at every step costs (layers x steps x documents) evaluations; instead the
layers are ranked by the search's own paired evidence (:func:`skip_effects`: on the documents
where the search ran the model without one layer, how the score moved against the full model),
and each step tries only the ``width`` best-ranked layers still in the chain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from lm_eval_cola.chain import Chain
from lm_eval_cola.scoring import Objective, Proposal, Trial
from lm_eval_cola.store import queries
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import Document

logger = logging.getLogger("lm_eval.cola")


def without(layers: Sequence[int], removed: int) -> Chain:
    return Chain.parse([layer for layer in layers if layer != removed])


def skip_effects(store: Store, run_ids: Sequence[int], n_layers: int) -> dict[int, float]:
    """Per layer, the mean paired change of score when the search ran the model without only
    that layer, over the documents where it also ran the full model; layers it never skipped
    alone are left out."""
    identity = list(range(n_layers))
    names = {str(without(identity, layer)): layer for layer in identity}
    full = str(Chain.identity(n_layers))
    with store.session() as session:
        rows = queries.chain_scores(session, run_ids, [full, *names])
    reference = {doc: score for doc, chain, score, _ in rows if chain == full}
    changes: dict[int, list[float]] = {}
    for doc, chain, score, _ in rows:
        if chain in names and doc in reference:
            changes.setdefault(names[chain], []).append(score - reference[doc])
    return {layer: sum(c) / len(c) for layer, c in changes.items()}


def prune(
    objective: Objective,
    documents: Sequence[Document],
    effects: dict[int, float],
    min_layers: int,
    width: int = 6,
    desc: str | None = "Pruning layers",
) -> list[tuple[Chain, list[Trial]]]:
    """The greedy path from the full model less one layer down to ``min_layers`` layers, each
    chain with its trials on ``documents``: at each step, of the ``width`` layers left with
    the best ``effects`` (layers without one last), the one whose removal scores best on
    ``documents`` (the first among equals)."""
    n_layers = objective.lm.executor.n_layers
    if not 1 <= min_layers < n_layers:
        raise ValueError(f"prune to 1..{n_layers - 1} layers, not {min_layers}")
    kept, path = list(range(n_layers)), []
    while len(kept) > min_layers:
        ranked = sorted(kept, key=lambda layer: -effects.get(layer, -math.inf))[:width]
        step = f"{desc}: {len(kept) - 1} layers" if desc else None
        removed, trials = _best_removal(objective, documents, kept, ranked, step)
        path.append((without(kept, removed), trials))
        kept.remove(removed)
    return path


def _best_removal(
    objective: Objective,
    documents: Sequence[Document],
    kept: list[int],
    ranked: list[int],
    desc: str | None,
) -> tuple[int, list[Trial]]:
    """Of the ``ranked`` layers, the one whose removal from ``kept`` scores best on
    ``documents`` (the first among equals), with its trials there."""
    options = [without(kept, layer) for layer in ranked]
    trials = objective.score_all([Proposal(d, c) for c in options for d in documents], 16, desc)
    n = len(documents)
    means = [sum(t.score for t in trials[i * n : (i + 1) * n]) / n for i in range(len(options))]
    best = max(range(len(options)), key=lambda i: (means[i], -i))
    tried = ", ".join(f"{layer}: {mean:.3f}" for layer, mean in zip(ranked, means, strict=True))
    logger.info("Pruned layer %d (mean score without it, per layer tried: %s)", ranked[best], tried)
    return ranked[best], trials[best * n : (best + 1) * n]
