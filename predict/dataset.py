"""A predictor's training set, built from the chains a search stored.

For the documents the training runs finished, a predictor learns which of a few *candidate*
chains (the identity, then the chains correct on the most training documents) answer each
document correctly. The table of scores is complete: a candidate the search never tried on a
document is evaluated there, with the same lm-eval objective the search used, so that "this
chain works on that document" is always measured, never assumed.

The runs must be of the loaded model and of one task whose configuration has not changed
since the search (same prompt, split and metric): anything else is refused before any compute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from sqlalchemy import select
from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor import MAX_ROUTED_RUNS
from lm_eval_cola.fingerprint import ModelIdentity, require_match
from lm_eval_cola.predict import PREDICTORS
from lm_eval_cola.predict.features import (
    FeatureSpec,
    PromptStates,
    prompt_of,
    run_routed,
    windowed_mean,
)
from lm_eval_cola.predict.pruning import prune, skip_effects
from lm_eval_cola.predict.training_set import RoutePath, TrainingDataError, TrainingSet
from lm_eval_cola.scoring import Objective, Proposal, Trial
from lm_eval_cola.store import queries
from lm_eval_cola.store.schema import Model, Run, Task, decoded_batch_invariantly
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import Document, TaskSpec, config_hash, task_documents

if TYPE_CHECKING:
    from lm_eval_cola.lm import ChainLM

logger = logging.getLogger("lm_eval.cola")
#: Documents scored in one forward pass while filling in the score table.
DOCUMENTS_AT_ONCE = 16
#: Training documents each step of the greedy pruning path is judged on.
PRUNING_DOCUMENTS = 300


@dataclass(frozen=True)
class _RunsInfo:
    task: Task
    run_ids: list[int]
    settings: dict

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec.stored(self.task.name, self.task.split, self.settings)


def build_training_set(
    lm: ChainLM,
    store: Store,
    runs: list[int | str],
    n_candidates: int = 16,
    spec: FeatureSpec | None = None,
    include_path: str | None = None,
    prune_to: int | None = None,
    kinds: Iterable[str] = tuple(PREDICTORS),
) -> TrainingSet:
    """Everything the predictors ``kinds`` train on, for the documents the ``runs`` finished;
    with ``prune_to``, the candidates include the greedy path of pruned chains down to that
    many layers (:mod:`~lm_eval_cola.predict.pruning`, chosen on the first
    ``PRUNING_DOCUMENTS`` training documents). Prompt states and router paths, a forward pass
    per document each, are computed only when one of the kinds reads them."""
    classes = [PREDICTORS.get(kind) for kind in kinds]
    info = _check_runs(store, runs, lm.identity)
    task = info.spec.load(include_path)
    if config_hash(task) != info.task.config_hash:
        raise TrainingDataError(
            f"task '{info.task.name}' is configured differently from when runs "
            f"{info.run_ids} searched it (prompt, data or metric changed); search it again"
        )
    documents, candidates, scores, correct = _score_table(store, info, task, n_candidates)
    invariant = decoded_batch_invariantly(info.settings)
    objective = Objective(lm, task, info.spec, batch_invariant=invariant)
    if prune_to is not None:
        effects = skip_effects(store, info.run_ids, lm.executor.n_layers)
        path = prune(objective, documents[:PRUNING_DOCUMENTS], effects, prune_to)
        _add_columns(path, objective.binary, candidates, scores, correct)
    filled = _fill_missing(objective, documents, candidates, scores, correct)
    spec = spec or FeatureSpec(layer=max(1, lm.executor.n_layers // 2))
    states = routes = None
    if any(c.reads_prompt for c in classes):
        encode = PromptStates(lm, spec)
        states = [encode(prompt_of(d.instances)) for d in tqdm(documents, desc="Prompt states")]
    if any(c.reads_routes for c in classes):
        routes = _route_paths(lm, store, info, documents, candidates, correct, spec.windows)
    return TrainingSet(
        task=info.task.name,
        split=info.task.split,
        metric=objective.metric,
        doc_hashes=[d.doc_hash for d in documents],
        candidates=candidates,
        scores=torch.tensor(scores, dtype=torch.float32),
        correct=torch.tensor(correct, dtype=torch.bool),
        states=states,
        spec=spec,
        filled=filled,
        routes=routes,
    )


def _route_paths(
    lm: ChainLM,
    store: Store,
    info: _RunsInfo,
    documents: list[Document],
    candidates: list[Chain],
    correct: list[list[bool]],
    windows: int,
) -> list[RoutePath | None]:
    """Each document's router path (:func:`route_path`), from the right chains its search
    found and the candidates right on it."""
    with store.session() as session:
        searched = queries.correct_chains(session, info.run_ids)
    return [
        route_path(
            lm,
            prompt_of(d.instances),
            right_chains(searched, d.doc_hash, candidates, row),
            windows,
        )
        for d, row in zip(tqdm(documents, desc="Router paths"), correct, strict=True)
    ]


def saved_or_built(path: str | None, build: Callable[[], TrainingSet]) -> TrainingSet:
    """The training set saved at ``path`` if there is one (a pickle: only load your own),
    else ``build()``, saved there when a path is given. Building scores thousands of chains;
    benchmarks that look at one training set several ways build it once."""
    if path and Path(path).is_file():
        return torch.load(path, weights_only=False)
    data = build()
    if path:
        torch.save(data, path)
    return data


def routable(chain: Chain, n_layers: int) -> list[int] | None:
    """The chain as runs per layer (0, 1 or 2, in order: what routers can express), or
    ``None``."""
    runs = [0] * n_layers
    for previous, layer in zip((-1, *chain.layers), chain.layers, strict=False):
        if layer < previous or runs[layer] == MAX_ROUTED_RUNS:
            return None
        runs[layer] += 1
    return runs


def right_chains(
    searched: dict[str, list[str]], doc_hash: str, candidates: list[Chain], correct: list[bool]
) -> list[Chain]:
    """The chains known to be right on a document: those its search found, then the
    candidates scored on it."""
    found = [Chain.parse(chain) for chain in searched.get(doc_hash, [])]
    return found + [chain for chain, right in zip(candidates, correct, strict=True) if right]


def shortest_routable(chains: list[Chain], n_layers: int) -> list[int] | None:
    """The runs per layer of the shortest chain routers can express (the first among equals),
    or ``None`` when none can be."""
    return next(iter(shortest_paths(chains, n_layers)), None)


def shortest_paths(chains: list[Chain], n_layers: int) -> list[list[int]]:
    """The runs per layer of every shortest chain routers can express, distinct, in order."""
    paths = [p for p in (routable(chain, n_layers) for chain in chains) if p is not None]
    shortest = min(map(sum, paths), default=0)
    return [list(p) for p in dict.fromkeys(tuple(p) for p in paths if sum(p) == shortest)]


def tie_shares(paths: list[list[int]]) -> torch.Tensor:
    """(layers, 3) for the first of ``paths``: per layer, of the paths equal to it on every
    earlier layer, the share running that layer 0, 1 or 2 times."""
    followed = paths[0]
    shares = torch.zeros(len(followed), MAX_ROUTED_RUNS + 1)
    for layer in range(len(followed)):
        agreeing = [p for p in paths if p[:layer] == followed[:layer]]
        for path in agreeing:
            shares[layer, path[layer]] += 1 / len(agreeing)
    return shares


def route_path(lm: ChainLM, prompt: str, right: list[Chain], windows: int) -> RoutePath | None:
    """The shortest of the document's right chains that routers can express (the first among
    equals), with the states entering each layer as routers following it would see them
    (teacher forcing) and the other shortest ones as :attr:`RoutePath.ties`; ``None`` when no
    right chain is routable."""
    paths = shortest_paths(right, lm.executor.n_layers)
    if not paths:
        return None
    runs = paths[0]
    seen: list[torch.Tensor] = []

    def follow(layer: int, hidden: torch.Tensor) -> int:
        seen.append(windowed_mean(hidden[0].float(), windows).cpu())
        return runs[layer]

    run_routed(lm, prompt, follow)
    ties = tie_shares(paths) if len(paths) > 1 else None
    return RoutePath(torch.tensor(runs), torch.stack(seen), ties)


def _check_runs(store: Store, runs: list[int | str], loaded: ModelIdentity) -> _RunsInfo:
    if not runs:
        raise TrainingDataError("name at least one search run to train on (--run)")
    with store.session() as session:
        found = []
        for run in runs:
            run_id = queries.find_run(session, run)
            if run_id is None:
                raise TrainingDataError(f"{store} has no run '{run}'")
            found.append(session.get(Run, run_id))
        tasks = {(r.task.name, r.task.config_hash) for r in found}
        if len(tasks) > 1:
            raise TrainingDataError(
                f"runs {[r.id for r in found]} searched different tasks or task configurations; "
                "train one predictor per task"
            )
        if len({r.settings.get("decoding") for r in found}) > 1:
            raise TrainingDataError(
                f"runs {[r.id for r in found]} decoded their generations in different modes "
                "(--decoding); train on runs of one mode"
            )
        for run in found:
            model, option = session.get(Model, run.model_id), f"--store {store.url}"
            what = f"run {run.id} of {store}"
            require_match(what, model.name, model.fingerprint, loaded, option, TrainingDataError)
        task = session.scalars(select(Task).where(Task.id == found[0].task_id)).one()
        session.expunge(task)
        return _RunsInfo(task, [r.id for r in found], dict(found[0].settings))


def _score_table(store: Store, info: _RunsInfo, task, n_candidates: int):
    """The training documents, the candidates, and the stored part of the score table (NaN
    where the store has no evaluation)."""
    with store.session() as session:
        hashes = queries.finished_documents(session, info.run_ids)
        frequent = queries.frequent_chains(session, info.run_ids, n_candidates)
        n_layers = session.get(Run, info.run_ids[0]).model.n_layers
        identity = str(Chain.identity(n_layers))
        names = list(dict.fromkeys([identity, *frequent]))[:n_candidates]
        stored = queries.chain_scores(session, info.run_ids, names)
    if not hashes:
        raise TrainingDataError(f"runs {info.run_ids} have no finished document yet")
    by_hash = {d.doc_hash: d for d in task_documents(task, None)}
    missing = [h for h in hashes if h not in by_hash]
    if missing:
        raise TrainingDataError(
            f"{len(missing)} searched documents of '{info.task.name}' are no longer in its data "
            f"(first: doc_hash {missing[0]}); the data set changed since the search"
        )
    row = {h: i for i, h in enumerate(hashes)}
    column = {c: j for j, c in enumerate(names)}
    scores = [[float("nan")] * len(names) for _ in hashes]
    correct = [[False] * len(names) for _ in hashes]
    for doc_hash, chain, score, is_correct in stored:
        if doc_hash in row:
            scores[row[doc_hash]][column[chain]] = score
            correct[row[doc_hash]][column[chain]] = bool(is_correct)
    return [by_hash[h] for h in hashes], [Chain.parse(c) for c in names], scores, correct


def _add_columns(
    path: list[tuple[Chain, list[Trial]]],
    binary: bool,
    candidates: list[Chain],
    scores: list[list[float]],
    correct: list[list[bool]],
) -> None:
    """Append the chains of a pruning path to the candidates, with what their trials on the
    first documents measured (graded metrics judge a chain against the full model, not scored
    yet: those cells stay missing)."""
    for chain, trials in path:
        if chain in candidates:
            continue
        candidates.append(chain)
        known = [(t.score, t.correct) for t in trials] if binary else []
        for i, (scored, right) in enumerate(zip(scores, correct, strict=True)):
            score, ok = known[i] if i < len(known) else (float("nan"), False)
            scored.append(score)
            right.append(ok)


def _fill_missing(
    objective: Objective,
    documents: list[Document],
    candidates: list[Chain],
    scores: list[list[float]],
    correct: list[list[bool]],
) -> int:
    """Evaluate the candidates the search did not try on a document; returns how many. The
    identity (column 0) the search stored is the reference of the others there."""
    for document, row in zip(documents, scores, strict=True):
        if row[0] == row[0]:
            objective.remember_reference(document.doc_hash, row[0])
    todo = [(i, j) for i, row in enumerate(scores) for j, s in enumerate(row) if s != s]
    proposals = [Proposal(documents[i], candidates[j]) for i, j in todo]
    trials = objective.score_all(proposals, DOCUMENTS_AT_ONCE, "Scoring candidates")
    for (i, j), trial in zip(todo, trials, strict=True):
        scores[i][j], correct[i][j] = trial.score, trial.correct
    logger.info("Scored %d candidate chains the search had not tried", len(todo))
    return len(todo)
