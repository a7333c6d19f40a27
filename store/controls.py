"""An oracle beside its controls: the decoy search of the same settings, and unguided runs.

A gold run and a decoy run (``cola search --target decoy``) pair up when they share model, task,
method, budget, seed, space and every other setting but the target. On the documents both have
finished, the question is how much more often a search reaches the gold answer than a wrong one
it was told to reach. A document counts for a target when the full model does not give that
target and some evaluated chain does. The fair comparison is on the documents where the full
model gives neither (both searches start from a wrong answer): there, *corrections above the
lottery* is the gold search's share minus the decoy's, with a paired 95% bootstrap interval.

The full model's own samples (``cola controls sampling``) are not chains, so they are kept
beside the store, as JSON lines (:func:`read_samples`); sampling@k is read from them the same
way, on the documents whose full model is wrong.

Unguided runs (``cola controls random`` and ``menu``) name their gold run in their settings
(``control_of``). ``@k`` of a run is the share of the documents whose full model is wrong where
one of the run's first ``k`` chains after the full model is right; the gold search's own
``@k`` beside them compares the label-guided search with chance at equal budgets.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from lm_eval_cola.chain import Chain
from lm_eval_cola.statistics import paired_interval
from lm_eval_cola.store.queries import (
    common_documents,
    first_correct_step,
    per_document,
    pick,
    run_depth,
)
from lm_eval_cola.store.schema import Document, Evaluation, Run

#: ``cola controls sampling`` files as read (:func:`read_samples`): (header, records) each
Samples = list[tuple[dict[str, Any], list[dict[str, Any]]]] | None


@dataclass(frozen=True)
class Reach:
    """Of the documents where the full model does not give a target, those a chain reaches."""

    documents: int
    reached: int

    @property
    def share(self) -> float | None:
        return self.reached / self.documents if self.documents else None


@dataclass(frozen=True)
class Lottery:
    """A gold run and its decoy run on the documents both finished."""

    gold_run: int
    decoy_run: int
    documents: int
    #: documents whose full model gives the gold answer, and the decoy
    gold_original: int
    decoy_original: int
    gold: Reach
    decoy: Reach
    #: on the documents where the full model gives neither answer
    neither: int
    gold_on_neither: int
    decoy_on_neither: int
    above_lottery: float | None
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class AtK:
    """A run's corrections within its first ``k`` chains after the full model, for each ``k``:
    of ``documents`` whose full model is wrong, how many; and of the ``right`` ones whose full
    model is right, how many keep a right chain shorter than the model (``shortened``)."""

    run_id: int
    method: str
    documents: int
    corrected: dict[int, int] = field(default_factory=dict)
    right: int = 0
    shortened: dict[int, int] = field(default_factory=dict)
    #: the chains it tries after the full model: its budget's, fewer for a short menu
    chains: int = 0


@dataclass(frozen=True)
class Controls:
    """A gold run with everything that says what chance alone would give."""

    gold_run: int
    #: the documents every run below finished
    documents: int
    decoy: Lottery | None
    #: the gold search itself first, then each unguided run
    at_k: list[AtK]

    @property
    def any(self) -> bool:
        """Whether anything controls the gold run: a decoy run or an unguided run."""
        return self.decoy is not None or len(self.at_k) > 1


def target_of(run: Run) -> str:
    return run.settings.get("target", "gold")


def paired_run(session: Session, run_id: int) -> int | None:
    """The run of the other target with every other setting the same, if there is one (the
    most recent, should there be several)."""
    run = session.get(Run, run_id)
    if run is None:
        raise ValueError(f"no run {run_id}")
    key = _settings_key(run)
    candidates = session.scalars(
        select(Run)
        .where(Run.model_id == run.model_id, Run.task_id == run.task_id, Run.id != run.id)
        .order_by(Run.id.desc())
    )
    for other in candidates:
        if target_of(other) != target_of(run) and _settings_key(other) == key:
            return other.id
    return None


def _settings_key(run: Run) -> tuple:
    settings = {k: v for k, v in run.settings.items() if k != "target"}
    return (run.method, run.budget, run.seed, run.space, settings)


def lottery(
    session: Session, gold_run: int, decoy_run: int, documents: list[int] | None = None
) -> Lottery:
    """The gold run against the decoy run, document by document, on the documents both
    finished (of ``documents``, where given)."""
    n_layers = run_depth(session, gold_run)
    gold = {row.document_id: row for row in per_document(session, gold_run, n_layers)}
    decoy = {row.document_id: row for row in per_document(session, decoy_run, n_layers)}
    wanted = set(gold if documents is None else documents)
    common = [
        d
        for d in gold
        if d in decoy and d in wanted and None not in (gold[d].original, decoy[d].original)
    ]
    neither = [d for d in common if not gold[d].original and not decoy[d].original]
    gold_hits = [bool(gold[d].any_correct) for d in neither]
    decoy_hits = [bool(decoy[d].any_correct) for d in neither]
    difference = (sum(gold_hits) - sum(decoy_hits)) / len(neither) if neither else None
    return Lottery(
        gold_run=gold_run,
        decoy_run=decoy_run,
        documents=len(common),
        gold_original=sum(bool(gold[d].original) for d in common),
        decoy_original=sum(bool(decoy[d].original) for d in common),
        gold=_reach(gold, common),
        decoy=_reach(decoy, common),
        neither=len(neither),
        gold_on_neither=sum(gold_hits),
        decoy_on_neither=sum(decoy_hits),
        above_lottery=difference,
        interval=paired_interval(gold_hits, decoy_hits) if neither else None,
    )


def _reach(rows: dict[int, Row], documents: list[int]) -> Reach:
    missed = [d for d in documents if not rows[d].original]
    return Reach(len(missed), sum(bool(rows[d].any_correct) for d in missed))


@dataclass(frozen=True)
class Curve:
    """One line of the controls figure: of the ``documents`` whose full model does not give
    the line's target, how many one of the first k chains (or samples) after the full model
    gives it, for k = 1, 2, ... (``reached[k - 1]``)."""

    label: str
    documents: int
    reached: list[int]
    #: ``search``: the gold search; ``decoy``: its decoy; ``unguided``; ``sampling``
    kind: str


@dataclass(frozen=True)
class ControlCurves:
    """A gold run's corrections against the number of chains, beside each of its controls',
    on the documents every run drawn finished."""

    gold_run: int
    documents: int
    curves: list[Curve]
    lottery: Lottery | None
    #: why the full model's own samples are not drawn, where a sampling file was given
    sampling_note: str | None = None


def control_curves(session: Session, run_id: int, samples: Samples = None) -> ControlCurves:
    """The gold run of ``run_id`` and its controls as curves (:class:`Curve`): the gold
    search, each unguided run, its decoy search (reaching its wrong answer) and, from the
    ``cola controls sampling`` files given for its model and task, the full model's own
    samples at each temperature."""
    gold = session.get(Run, gold_of(session, run_id))
    decoy = paired_run(session, gold.id)
    unguided = [run for run in controls_of(session, gold) if common_documents(session, [run.id])]
    runs = [gold, *unguided, *([session.get(Run, decoy)] if decoy is not None else [])]
    documents = common_documents(session, [run.id for run in runs])
    curves = [_run_curve(session, run, documents, gold) for run in runs]
    runs_of_files = list(session.scalars(select(Run))) if samples else []
    drawn = samples_by_model_and_task(runs_of_files, samples).get((gold.model_id, gold.task_id))
    note = None
    if drawn is not None:
        sampled, note = _sampling_curves(session, gold, documents, *drawn)
        curves += sampled
    elif samples:
        note = "no sampling file given was drawn for this model and task"
    return ControlCurves(
        gold_run=gold.id,
        documents=len(documents),
        curves=curves,
        lottery=lottery(session, gold.id, decoy, documents) if decoy is not None else None,
        sampling_note=note,
    )


def _run_curve(session: Session, run: Run, documents: list[int], gold: Run) -> Curve:
    steps = first_correct_step(session, run.id, documents)
    started_wrong = [step for step in steps if step != 1]
    reached = [
        sum(step is not None and step <= k + 1 for step in started_wrong)
        for k in range(1, chains_of(run) + 1)
    ]
    if run.id == gold.id:
        label, kind = f"gold search ({run.method}, run {run.id})", "search"
    elif target_of(run) == "decoy":
        label, kind = f"decoy search, its wrong answer (run {run.id})", "decoy"
    else:
        label, kind = f"{run.method} chains, unguided (run {run.id})", "unguided"
    return Curve(label, len(started_wrong), reached, kind)


def _sampling_curves(
    session: Session, gold: Run, documents: list[int], k: int, records: list[dict]
) -> tuple[list[Curve], str | None]:
    """The full model's own samples per temperature on the originally wrong ``documents``;
    none, with the reason, where the file does not cover them all."""
    right, mine = samples_on(session, gold.id, documents, records)
    covered = {r["doc_hash"] for r in mine}
    if covered != set(right):
        return [], f"own samples cover {len(covered)} of the {len(right)} documents: not drawn"
    wrong = sum(not ok for ok in right.values())
    counts = sampled_corrections(mine, right, list(range(1, k + 1)))
    curves = [
        Curve(f"own samples, temperature {t}", wrong, list(by_k.values()), "sampling")
        for t, by_k in counts.items()
    ]
    return curves, None


def samples_on(
    session: Session, gold_run: int, documents: list[int], records: list[dict[str, Any]]
) -> tuple[dict[str, bool], list[dict[str, Any]]]:
    """Of ``documents``, whether the gold run's full model is right on each (by content hash),
    and a sampling file's records of them (all of them only where the file covers them)."""
    hashes = set(session.scalars(select(Document.doc_hash).where(Document.id.in_(documents))))
    right = {h: ok for h, ok in originals(session, gold_run).items() if h in hashes}
    return right, [r for r in records if r["doc_hash"] in right]


def controls(session: Session, run_id: int) -> Controls:
    """Everything stored that controls the gold run ``run_id`` (or the gold run of a decoy or
    unguided run ``run_id``), on the documents all of them finished. An unguided run that has
    finished no document yet (just started) is left out rather than leave none to compare."""
    gold = session.get(Run, gold_of(session, run_id))
    decoy = paired_run(session, gold.id)
    started = controls_of(session, gold)
    runs = [gold, *(run for run in started if common_documents(session, [run.id]))]
    documents = common_documents(session, [run.id for run in runs])
    budgets = sorted({1, 5, gold.budget - 1, *(run.budget - 1 for run in runs[1:])} - {0})
    return Controls(
        gold_run=gold.id,
        documents=len(documents),
        decoy=lottery(session, gold.id, decoy) if decoy is not None else None,
        at_k=[at_k(session, run, documents, budgets) for run in runs],
    )


def gold_of(session: Session, run_id: int) -> int:
    """The gold run that run ``run_id`` controls, or ``run_id`` itself if it is a gold run."""
    run = session.get(Run, run_id)
    if run is None:
        raise ValueError(f"no run {run_id}")
    if run.settings.get("control_of"):
        found = session.scalar(select(Run.id).where(Run.name == run.settings["control_of"]))
        if found is None:
            raise ValueError(f"run {run_id} controls run '{run.settings['control_of']}', gone")
        return found
    if target_of(run) == "decoy":
        gold = paired_run(session, run_id)
        if gold is None:
            raise ValueError(f"decoy run {run_id} has no gold run of the same settings")
        return gold
    return run_id


def controls_of(session: Session, gold: Run) -> list[Run]:
    """The unguided runs made as controls of ``gold``, oldest first."""
    if gold.name is None:  # controls name their gold run, so an unnamed run has none
        return []
    runs = session.scalars(select(Run).where(Run.task_id == gold.task_id).order_by(Run.id))
    return [run for run in runs if run.settings.get("control_of") == gold.name]


def roles(session: Session) -> dict[int, str]:
    """Per run, its place among the controls, for listings: a gold run names its controls
    (``decoy 2, random-walk 3``, or ``none``), a control the run it controls (``of 1``)."""
    found = {}
    for run in session.scalars(select(Run).order_by(Run.id)):
        try:
            gold = gold_of(session, run.id)
        except ValueError:  # a decoy without its gold run, or a control whose gold is gone
            found[run.id] = "of none"
            continue
        if gold != run.id:
            found[run.id] = f"of {gold}"
            continue
        decoy = paired_run(session, run.id)
        named = [f"decoy {decoy}"] * (decoy is not None)
        named += [f"{control.method} {control.id}" for control in controls_of(session, run)]
        found[run.id] = ", ".join(named) or "none"
    return found


def at_k(session: Session, run: Run, documents: list[int], budgets: list[int]) -> AtK:
    """``run``'s corrections and shortenings within its first k chains after the full model
    (see :class:`AtK`), on ``documents``."""
    steps = first_correct_step(session, run.id, documents)
    shorter = first_correct_step(session, run.id, documents, shorter=True)
    wrong = [step for step in steps if step != 1]
    kept = [step for step, first in zip(shorter, steps, strict=True) if first == 1]
    ks = [k for k in budgets if k < run.budget]  # budget b: b - 1 chains after the full model

    def within(found: list[int | None]) -> dict[int, int]:
        return {k: sum(step is not None and step <= k + 1 for step in found) for k in ks}

    return AtK(
        run.id, run.method, len(wrong), within(wrong), len(kept), within(kept), chains_of(run)
    )


def chains_of(run: Run) -> int:
    """How many chains ``run`` tries after the full model: ``budget - 1``, or fewer for a
    menu whose training run had fewer right chains, whose "within all its chains" then means
    fewer than the search's."""
    menu = run.settings.get("method_options", {}).get("chains")
    return run.budget - 1 if menu is None else min(run.budget - 1, len(menu))


def run_lengths(session: Session, run_id: int) -> dict[int, int]:
    """How many of the run's evaluated chains have each length, the full model left out: the
    length distribution an unguided control draws from."""
    n_layers = run_depth(session, run_id)
    identity = str(Chain.identity(n_layers))
    lengths = session.scalars(
        select(Evaluation.length).where(Evaluation.run_id == run_id, Evaluation.chain != identity)
    )
    return dict(sorted(Counter(lengths).items()))


def originals(session: Session, run_id: int) -> dict[str, bool]:
    """Per document the run evaluated the full model on (by content hash): is it right?"""
    rows = per_document(session, run_id, run_depth(session, run_id))
    known = {row.document_id: bool(row.original) for row in rows if row.original is not None}
    hashes = session.execute(select(Document.id, Document.doc_hash).where(Document.id.in_(known)))
    return {doc_hash: known[document_id] for document_id, doc_hash in hashes}


def original_answers(session: Session, run_id: int) -> dict[str, str | None]:
    """Per document the run evaluated the full model on (by content hash): its answer."""
    identity = str(Chain.identity(run_depth(session, run_id)))
    rows = session.execute(
        select(Document.doc_hash, Evaluation.response)
        .join(Document, Document.id == Evaluation.document_id)
        .where(Evaluation.run_id == run_id, Evaluation.chain == identity)
    )
    return {doc_hash: answer for doc_hash, answer in rows}


def rescues(session: Session, run_id: int) -> dict[str, str]:
    """The run's rescues: per originally wrong document (by content hash), its shortest
    correct chain."""
    wrong = {doc_hash for doc_hash, right in originals(session, run_id).items() if not right}
    picks = pick(session, [run_id], "shortest-correct")
    return {p.doc_hash: p.chain for p in picks if p.doc_hash in wrong and p.correct}


def belongs(header: dict[str, Any], run: Run) -> bool:
    """Whether a controls file names ``run``: its name, and its model's fingerprint where the
    file records one (files written before it did name the run alone)."""
    fingerprint = header.get("fingerprint", run.model.fingerprint)
    return header["run"] == run.name and fingerprint == run.model.fingerprint


def samples_by_model_and_task(
    runs: list[Run], samples: Samples
) -> dict[tuple[int, int], tuple[int, list[dict]]]:
    """Each ``cola controls sampling`` file as (k, records), by the (model id, task id) of the
    run of ``runs`` it was drawn for: the samples run no chain, so they serve every run of that
    model and task, whatever its space (never another model's run of the same name in another
    store)."""
    return {
        (run.model_id, run.task_id): (header["k"], records)
        for header, records in samples or []
        for run in runs
        if belongs(header, run)
    }


def read_text(path: str | Path) -> str:
    """A controls file's text, decompressed where its name ends in ``.gz``."""
    data = Path(path).read_bytes()
    return (gzip.decompress(data) if Path(path).suffix == ".gz" else data).decode("utf-8")


def append_text(path: str | Path, text: str) -> None:
    """Append to a controls file; to a ``.gz`` one as a gzip member of its own (``gzip`` reads
    the members as one stream), compressed before the one write, so that a file of thousands
    of sampled answers stays small and a killed process leaves its earlier records whole."""
    data = text.encode("utf-8")
    with Path(path).open("ab") as out:
        out.write(gzip.compress(data) if Path(path).suffix == ".gz" else data)


def read_samples(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ``cola controls sampling`` file: its header (gold run, k, seed) and one record per
    document and temperature (``doc_hash``, ``temperature``, ``correct`` per sample, ...)."""
    return read_records(path, "cola controls sampling")


def read_records(path: str | Path, written_by: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A controls file of JSON lines: its header (naming the gold run) and its records."""
    lines = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
    if not lines or "run" not in lines[0]:
        raise ValueError(f"{path} is not a file of {written_by}")
    return lines[0], lines[1:]


#: What ``cola controls reversion|shuffle --output`` counts, by check.
CHECK_COUNTS = {
    "reversion": {"rescues", "checked", "reversions", "still_right", "robust", "fragile"},
    "shuffle": {"rescues", "shuffles", "content", "position", "full_model_right"},
}


def read_checks(path: str | Path) -> dict[str, Any]:
    """A ``cola controls reversion|shuffle --output`` file: its gold run's name, its check and
    the counts of :data:`CHECK_COUNTS`."""
    try:
        counts = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err})") from None
    wanted = CHECK_COUNTS.get(counts.get("check") if isinstance(counts, dict) else None)
    if wanted is None or "run" not in counts or not wanted <= set(counts):
        raise ValueError(
            f"{path} is not a file of cola controls reversion|shuffle --output (or one written "
            "before it named its run): run the check again with --output"
        )
    return counts


def sampled_corrections(
    records: list[dict[str, Any]], originals: dict[str, bool], budgets: list[int]
) -> dict[float, dict[int, int]]:
    """Per temperature and each k of ``budgets``: the documents whose full model is wrong where
    one of the first k samples is right."""
    corrected: dict[float, dict[int, int]] = {}
    for temperature in sorted({r["temperature"] for r in records}):
        missed = [
            r["correct"]
            for r in records
            if r["temperature"] == temperature and not originals[r["doc_hash"]]
        ]
        corrected[temperature] = {k: sum(any(c[:k]) for c in missed) for k in budgets}
    return corrected
