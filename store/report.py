"""``cola report``: every oracle in the stores, with the controls that say what chance gives.

One row per gold search run (a search rewarded by the gold answer): its data set and space,
the full model, the oracle (some evaluated chain right), the same search rewarded by a decoy,
and the unguided controls, each counted on the documents whose full model is wrong, within 1,
5 and the search's budget of chains (a cell reads ``10, 39, 69/98``). The last column is
*corrections above the lottery*: where the full model gives neither the gold nor the decoy
answer, the gold search's share minus the decoy's, with a paired 95% interval
(:mod:`lm_eval_cola.store.controls`). A row whose controls are missing says so (``-``)
instead of standing alone: run ``cola search --target decoy`` and ``cola controls``. A
generation run's ``cola controls sampling`` file (``--sampling``) adds the model's own sampling
at the same numbers of answers, at its best temperature for each; the samples run no chain, so
one file serves every gold run of its run's model and task, whatever their space. A scored
task (log-likelihood) has no sampling to draw: its cell says ``n/a``. A second table does the
same for the paper's other claim: of the documents the full model gets right, those that keep
a right chain shorter than the model, found by the search and by the unguided chains. A third
sets out the rescue checks of ``cola controls shuffle`` and ``reversion`` whose ``--output``
files are given with ``--checks`` (refused when the run has other rescues since).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lm_eval_cola.cli import add_command

if TYPE_CHECKING:
    from lm_eval_cola.store.controls import AtK

HELP = "every oracle in the stores beside its decoy, random and menu controls"
EPILOG = """examples:
  cola report --store results/controls.db
  cola report --store results/controls.db --store results/qwen.db --output docs/controls.md
  cola report --store results/gen.db --sampling results/gen-arc-easy-sampling.jsonl
  cola report --store cola.db --checks reversion.json --checks shuffle.json
"""
#: The unguided controls, by method, in the order of the table's columns.
CONTROL_METHODS = ("random-walk", "menu")
CHECKS_CAPTION = (
    "Rescue checks (the shortest right chain of each originally wrong document, on all the "
    "gold run's documents, not only those its controls finished; `cola controls "
    "shuffle|reversion`): a rescue that follows the answer's content stays right when the "
    "options move, one that follows the position answers where the gold answer was; undoing "
    "its edits one at a time says how much of it is needed:"
)
SHORTER_CAPTION = (
    "Originally right documents that keep a right chain shorter than the model (the paper: "
    "over 75%), the search beside unguided chains on the same documents:"
)


#: documents corrected (or shortened) within each of a row's numbers of chains
#: (:func:`chain_counts`), of how many originally wrong (or right) ones
Corrections = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class OracleRow:
    """A gold run beside its controls: counts as (part, whole), ``None`` where a control was
    not run."""

    run: str
    task: str
    space: str
    budget: int
    #: a generation task, which the model's own sampling can answer (a scored one cannot)
    generates: bool
    #: the documents the run and its unguided controls all finished
    documents: int
    original_right: int
    #: the search's corrections, then each unguided control's at the same numbers of chains
    corrected: Corrections
    controls: dict[str, Corrections] = field(default_factory=dict)
    #: the controls that try fewer chains than the search (a short menu): how many
    control_chains: dict[str, int] = field(default_factory=dict)
    #: the full model's own samples, as many as the chains, at the best temperature for each
    sampling: Corrections | None = None
    #: of the originally right documents, those that keep a right chain shorter than the
    #: model: the search's, then each unguided control's
    shortened: Corrections | None = None
    controls_shortened: dict[str, Corrections] = field(default_factory=dict)
    #: the shortest right chain of each originally wrong document, and the counts of
    #: ``cola controls reversion`` and ``shuffle`` on them, by check
    rescues: int = 0
    checks: dict[str, dict] = field(default_factory=dict)
    #: on the documents the run and its decoy run both finished: some chain gives the target
    #: where the full model does not, for the gold answer and for the decoy
    gold_reached: tuple[int, int] | None = None
    decoy_reached: tuple[int, int] | None = None
    above_lottery: str | None = None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "report", HELP, __doc__, EPILOG)
    parser.add_argument(
        "--store", action="append", required=True, help="SQLite path or URL (repeatable)"
    )
    parser.add_argument(
        "--sampling",
        action="append",
        default=[],
        help="a cola controls sampling file, for the rows of its run's model and task (repeatable)",
    )
    parser.add_argument(
        "--checks",
        action="append",
        default=[],
        help="a cola controls reversion|shuffle --output file, for its run's row (repeatable)",
    )
    parser.add_argument("--output", help="also write the tables to this Markdown file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lm_eval_cola.errors import report
    from lm_eval_cola.store.controls import read_checks, read_samples
    from lm_eval_cola.store.engine import StoreError
    from lm_eval_cola.store.store import Store

    rows: list[OracleRow] = []
    try:
        samples = [read_samples(path) for path in args.sampling]
        checks = [read_checks(path) for path in args.checks]
        for url in args.store:
            with Store(url, read_only=True) as store, store.session() as session:
                rows += oracle_rows(session, samples, checks)
    except (StoreError, OSError, ValueError) as err:
        return report("cola report", err)
    table = markdown(rows)
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(table + "\n")
    return 0


def oracle_rows(
    session,
    samples: list[tuple[dict, list[dict]]] | None = None,
    checks: list[dict] | None = None,
) -> list[OracleRow]:
    """A row per gold search run of the store, oldest first; ``samples``: the full model's
    samples as (header, records), each given to every gold run of the model and task of the
    run it was drawn for (a row whose documents they do not all cover gets none); ``checks``:
    the rescue checks' counts, each for the run it names. A file belongs to a run of its name
    and, where it records one, its model's fingerprint (never to another model's run of the
    same name in another store)."""
    from sqlalchemy import select

    from lm_eval_cola.store.controls import belongs, samples_by_model_and_task, target_of
    from lm_eval_cola.store.schema import Run

    runs = list(session.scalars(select(Run).order_by(Run.id)))
    gold = [r for r in runs if target_of(r) == "gold" and not r.settings.get("control_of")]
    drawn_for = samples_by_model_and_task(runs, samples)
    return [
        _row(
            session,
            run,
            drawn_for.get((run.model_id, run.task_id)),
            {counts["check"]: counts for counts in checks or [] if belongs(counts, run)},
        )
        for run in gold
        if run.method not in CONTROL_METHODS
    ]


def _row(
    session, run, samples: tuple[int, list[dict]] | None, checks: dict[str, dict]
) -> OracleRow:
    from lm_eval_cola.store.controls import controls, rescues

    rescued = len(rescues(session, run.id))
    for counts in checks.values():
        if counts["rescues"] != rescued:
            raise ValueError(
                f"the {counts['check']} check of run '{run.name}' counted {counts['rescues']} "
                f"rescues, the run has {rescued} now: run cola controls {counts['check']} again"
            )

    found = controls(session, run.id)
    search, *others = found.at_k
    others = _one_per_method(others)
    ks, lottery = chain_counts(run.budget), found.decoy

    def at(row: AtK, shortened: bool = False) -> Corrections | None:
        counts = row.shortened if shortened else row.corrected
        if not set(ks) <= set(counts):  # a control of fewer chains
            return None
        return tuple(counts[k] for k in ks), row.right if shortened else row.documents

    return OracleRow(
        run=run.name or str(run.id),
        task=run.task.name,
        space=run.space.get("mode", "both"),
        budget=run.budget,
        generates=run.task.output_type == "generate_until",
        documents=found.documents,
        # every search evaluates the full model first: the documents it got right are those
        # that are not among the search's originally wrong ones
        original_right=found.documents - search.documents,
        corrected=at(search),
        controls={a.method: count for a in others if (count := at(a))},
        control_chains={a.method: a.chains for a in others if 0 < a.chains < ks[-1]},
        sampling=None if samples is None else _sampled(session, found, ks, samples),
        shortened=at(search, shortened=True),
        controls_shortened={a.method: count for a in others if (count := at(a, shortened=True))},
        gold_reached=None if lottery is None else (lottery.gold.reached, lottery.gold.documents),
        decoy_reached=None if lottery is None else (lottery.decoy.reached, lottery.decoy.documents),
        above_lottery=None if lottery is None else _lottery_text(lottery),
        rescues=rescued,
        checks=checks,
    )


def _one_per_method(unguided: list[AtK]) -> list[AtK]:
    """A row has a column per method: of several controls of one method (say, a second menu
    from a larger training search), the one that tries the most chains, the latest of equals,
    rather than whichever comes last. ``cola db controls`` lists them all."""
    chosen: dict[str, AtK] = {}
    for control in unguided:  # oldest first
        if control.chains >= chosen.get(control.method, control).chains:
            chosen[control.method] = control
    return list(chosen.values())


def chain_counts(budget: int) -> list[int]:
    """The numbers of chains a row compares at: 1, 5 and all the search's chains after the
    full model (those of them a run of ``budget`` evaluations has)."""
    return [k for k in (1, 5) if k < budget - 1] + [budget - 1]


def _sampled(session, found, ks: list[int], samples: tuple[int, list[dict]]) -> Corrections | None:
    """The originally wrong documents (of those every run of the row finished) that one of
    the model's first k samples gets right, for each k of ``ks``, at the best temperature for
    that k; ``None`` when fewer were sampled or a document was not."""
    from lm_eval_cola.store.controls import sampled_corrections, samples_on
    from lm_eval_cola.store.queries import common_documents

    sampled, records = samples
    gold = found.at_k[0]
    ids = common_documents(session, [row.run_id for row in found.at_k])
    right, mine = samples_on(session, gold.run_id, ids, records)
    if sampled < ks[-1] or not right or {r["doc_hash"] for r in mine} != set(right):
        return None
    counts = sampled_corrections(mine, right, ks).values()
    return tuple(max(c[k] for c in counts) for k in ks), sum(not r for r in right.values())


def _lottery_text(lottery) -> str:
    if lottery.above_lottery is None:
        return "-"
    low, high = lottery.interval
    return (
        f"{100 * lottery.above_lottery:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
        f"on {lottery.neither}"
    )


def markdown(rows: list[OracleRow]) -> str:
    """Three tables, one row per oracle: its corrections beside its controls, its
    shortenings (the paper's other claim) beside the unguided controls', and its rescue
    checks."""
    from lm_eval_cola.store.cli import chains_text, share_text

    def cell(count: tuple[int, int] | None) -> str:
        return "-" if count is None else share_text(*count)

    def at_ks(count: Corrections | None, chains: int | None = None) -> str:
        if count is None:
            return "-"
        (*fewer, most), whole = count
        return ", ".join([*map(str, fewer), share_text(most, whole)]) + (
            f" with its {chains_text(chains)}" if chains else ""
        )

    header = [
        "run", "data set", "space", "budget", "documents", "full model right",
        "wrong -> right within 1, 5, all chains: search", *CONTROL_METHODS,
        "own sampling (best temperature)",
        "gold reached", "decoy reached", "corrections above the lottery [95% CI], on",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.run, r.task, r.space, str(r.budget), str(r.documents),
            share_text(r.original_right, r.documents), at_ks(r.corrected),
            *(at_ks(r.controls.get(m), r.control_chains.get(m)) for m in CONTROL_METHODS),
            at_ks(r.sampling) if r.generates else "n/a",
            cell(r.gold_reached), cell(r.decoy_reached), r.above_lottery or "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", SHORTER_CAPTION, ""]
    header = [
        "run", "data set", "space", "documents", "full model right",
        "right -> a shorter right chain within 1, 5, all chains: search", *CONTROL_METHODS,
    ]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.run, r.task, r.space, str(r.documents), share_text(r.original_right, r.documents),
            at_ks(r.shortened),
            *(at_ks(r.controls_shortened.get(m), r.control_chains.get(m)) for m in CONTROL_METHODS),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", CHECKS_CAPTION, ""]
    header = [
        "run", "rescues", "options moved: rescue still right", "answers the old position",
        "full model right", "one edit undone: still right", "rescues surviving every undoing",
        "surviving none",
    ]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r.run, str(r.rescues), *_check_cells(r.checks)]) + " |")
    return "\n".join(lines)


def _check_cells(checks: dict[str, dict]) -> list[str]:
    """The shuffle's three shares of its shuffled documents, then the reversion's: of its
    reversions, then of its rescues; ``-`` for a check not given."""
    from lm_eval_cola.store.cli import share_text

    shuffle, reversion = checks.get("shuffle"), checks.get("reversion")
    cells = ["-"] * 6
    if shuffle:
        whole = shuffle["shuffles"]
        cells[:3] = [
            share_text(shuffle[n], whole) for n in ("content", "position", "full_model_right")
        ]
    if reversion:
        cells[3] = share_text(reversion["still_right"], reversion["reversions"])
        cells[4:] = [share_text(reversion[n], reversion["checked"]) for n in ("robust", "fragile")]
    return cells
