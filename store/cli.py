"""``cola db``: look into a chain store from the shell (``frames.py`` is the same from Python).

Read commands open the store read-only, so a mistyped ``--store`` is an error instead of a new
empty store, and ``cola db sql`` cannot change it. Every error (a store that cannot be read, an
unknown run, a file that cannot be written) is one line on stderr and exit status 1.

This module imports nothing heavy at load time: ``cola`` imports it to build its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval_cola.cli import add_command

if TYPE_CHECKING:
    import pandas as pd

    from lm_eval_cola.store.compare import Comparison, Side
    from lm_eval_cola.store.controls import AtK, Controls, Lottery
    from lm_eval_cola.store.queries import RunStats

EPILOG = """examples:
  cola db runs --store cola.db
  cola db stats --store cola.db --run 3
  cola db compare --store cpu.db --run 3 --other_store gpu.db --other_run 3
  cola db chains --store cola.db --run 3 --format csv --output chains.csv
  cola db sql --store cola.db "SELECT chain, COUNT(*) FROM evaluations GROUP BY chain LIMIT 5"
  cola db export --store cola.db --format parquet --output_dir dump/
  cola db archive --store cola.db --output results/cola.db.gz
  cola db restore --archive results/cola.db.gz --store cola.db
  cola db upgrade --store cola.db

--store takes an SQLite path or an SQLAlchemy URL (postgresql+psycopg://user@host/cola).
"""

#: ``queries.PICKS``, named here so that building the parser imports no SQLAlchemy (a test
#: checks that they agree).
PICKS = ("best", "shortest-correct")
FORMATS = ("table", "csv", "json")
STATS_DETAILS = """\
Original accuracy: documents whose identity chain (the full model) is correct, of those
  evaluated with it. Oracle accuracy: documents some evaluated chain gets right.
Of the originally correct documents, the share where a shorter chain is also correct; of the
  originally wrong ones, the share some chain corrects.
The best chain of each document (highest score, then shortest; as cola db chains --pick best):
  its mean length against the model's depth, and per layer how often the best chains apply it
  on average (usage) and the share of best chains that skip the layer and that repeat it.
Distinct answers: how many different answers (the option chosen, or the generated answer) a
  document's evaluated chains gave; many answers mean a search for the gold one is partly a
  lottery over answers.
Beside its controls: a gold run's corrections above the lottery (its decoy search), and its
  corrections and shortenings within the same number of chains against each unguided control
  (cola controls random|menu); a run without controls says so, a control names its gold run."""
#: Decimals of shares and accuracies in tables.
DIGITS = 3

Command = Callable[[argparse.Namespace], None]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``db`` and its sub-commands on the ``cola`` sub-commands."""
    db = add_command(
        subparsers,
        "db",
        help="query a chain store: runs, chains, the paper's statistics, SQL, export",
        description="Query, export and upgrade a chain store.",
        epilog=EPILOG,
    )
    commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    _add_runs(commands)
    _add_chains(commands)
    _add_stats(commands)
    _add_controls(commands)
    _add_compare(commands)
    _add_sql(commands)
    _add_export(commands)
    _add_archive(commands)
    _add_restore(commands)
    _add_upgrade(commands)


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    example: str,
    run: Command,
    details: str = "",
    prefix: str = "db ",
) -> argparse.ArgumentParser:
    """A sub-command with ``--store``, whose errors are reported as one line."""
    parser = add_command(
        commands,
        name,
        help=summary,
        description="\n\n".join(filter(None, [summary[0].upper() + summary[1:] + ".", details])),
        epilog=f"example:\n  {example}",
    )
    parser.add_argument(
        "--store", default="cola.db", help="SQLite path or SQLAlchemy URL (default: cola.db)"
    )
    parser.set_defaults(
        func=functools.partial(_reporting_errors, run), command_name=f"{prefix}{name}"
    )
    return parser


def _reporting_errors(run: Command, args: argparse.Namespace) -> int:
    """Run a sub-command; a store, database or file error becomes one line on stderr."""
    from sqlalchemy.exc import SQLAlchemyError

    from lm_eval_cola.store.engine import StoreError

    try:
        run(args)
    except (StoreError, SQLAlchemyError, OSError, ImportError, ValueError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"cola {args.command_name}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _add_runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        required=True,
        nargs="+",
        action="extend",
        help="run id or name; several runs: --run 3 4, or --run 3 --run grid",
    )


def _add_format_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    parser.add_argument(
        "--format", choices=formats, default=formats[0], help="(default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, help="write to this file instead of stdout")


# -- runs -------------------------------------------------------------------------------------


def _add_runs(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "runs",
        "list the runs: status, budget, progress, headline accuracies",
        "cola db runs --store cola.db --format csv --output runs.csv",
        _runs,
    )
    _add_format_arguments(parser, FORMATS)


def _runs(args: argparse.Namespace) -> None:
    """The table shows the main columns; csv and json give every column."""
    import pandas as pd

    from lm_eval_cola.store import frames

    with frames.opened(args.store) as store:
        runs = frames.runs(store)
        if runs.empty and args.format == "table":
            print(f"{store} has no runs yet")
            return
    if args.format != "table":
        _write(runs, args.format, args.output, "runs")
        return
    runs["done"] = runs["done"].astype(str) + "/" + runs["n_documents"].astype(str)
    runs["started"] = runs["started_at"].dt.strftime("%Y-%m-%d %H:%M")
    # A killed search stays "running": when it last finished a document tells the two apart.
    last = pd.to_datetime(runs["last_document_at"])
    runs["last document"] = last.dt.strftime("%Y-%m-%d %H:%M")
    shown = runs.rename(columns={"original_accuracy": "original", "oracle_accuracy": "oracle"})
    columns = ["id", "name", "method", "model", "task", "status", "budget", "done"]
    shown = shown[[*columns, "evaluations", "original", "oracle", "controls"]]
    table = shown.assign(started=runs["started"], **{"last document": runs["last document"]})
    _write(table, "table", args.output, "runs")


# -- chains -----------------------------------------------------------------------------------


def _add_chains(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "chains",
        "the chain picked per document, or every chain evaluated",
        "cola db chains --store cola.db --run 3 --pick shortest-correct --format csv",
        _chains,
    )
    _add_runs_argument(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--pick",
        choices=PICKS,
        default="best",
        help="best: highest score, then shortest; shortest-correct: shortest correct chain, "
        "then highest score; documents without a correct chain are left out (default: best)",
    )
    which.add_argument("--all", action="store_true", help="every evaluated chain, best first")
    _add_format_arguments(parser, FORMATS)


def _chains(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import frames

    chains = frames.chains(args.store, args.run, pick=None if args.all else args.pick)
    _write(chains, args.format, args.output, "chains")


# -- stats ------------------------------------------------------------------------------------


def _add_stats(commands: argparse._SubParsersAction) -> None:
    _add_run_report(
        commands,
        "stats",
        "the CoLa paper's questions for one run",
        "cola db stats --store cola.db --run 3 --format json",
        STATS_DETAILS,
        "run_stats",
        _stats_text,
    )


def _add_run_report(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    example: str,
    details: str,
    compute: str,
    as_text: Callable[[Any], str],
) -> None:
    """A sub-command reporting on one run (``--run``): ``frames.<compute>`` as text or JSON."""

    def report(args: argparse.Namespace) -> None:
        from lm_eval_cola.store import frames

        _print_result(getattr(frames, compute)(args.store, args.run), args.format, as_text)

    parser = _command(commands, name, summary, example, report, details=details)
    parser.add_argument("--run", required=True, help="run id or name")
    _add_result_format(parser)


def _add_result_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="(default: %(default)s)"
    )


def _print_result(result: Any, fmt: str, as_text: Callable[[Any], str]) -> None:
    """A report's dataclass as text, or as JSON with every field."""
    print(json.dumps(dataclasses.asdict(result), indent=2) if fmt == "json" else as_text(result))


def _stats_text(result: RunStats) -> str:
    """The answers as aligned lines, then the per-layer rates as a table with a column per
    layer (wrapped at 100 characters for deep models)."""
    from lm_eval_cola.chain import Chain

    share = functools.partial(_number, digits=DIGITS)
    lines = {
        f"original accuracy (chain {Chain.identity(result.n_layers)})": share(
            result.original_accuracy
        ),
        "oracle accuracy (some chain correct)": share(result.oracle_accuracy),
        "originally correct with a shorter correct chain": share(result.shorter_correct_share),
        "originally wrong that some chain corrects": share(result.corrected_share),
        "mean length of the best chains": f"{result.mean_chosen_length:.2f} "
        f"(model depth {result.n_layers})",
        "token-layer applications computed": _work_text(result),
        "distinct answers among a document's chains": _answers_text(result),
    }
    width = max(map(len, lines))
    layers = _layer_table(result)
    return "\n".join(
        [
            f"run {result.run_id}: {result.documents} documents evaluated",
            *(f"  {label:<{width}}  {value}" for label, value in lines.items()),
            "",
            *_beside_text(result),
            "",
            "per layer: mean applications in the best chains, share that skip it, that repeat it:",
            layers,
        ]
    )


# -- controls ---------------------------------------------------------------------------------

CONTROLS_DETAILS = """\
Pairs a gold run with the decoy run of the same settings (cola search --target decoy: the
  same search rewarded by a designated wrong answer) and compares them on the documents both
  finished. For each target: documents whose full model gives it, and of the others those
  where some evaluated chain gives it. On the documents where the full model gives neither,
  corrections above the lottery: the gold search's share minus the decoy's, with a paired 95%
  bootstrap interval. An interval that includes 0 says the oracle's corrections are no more
  than a search for any answer would find."""


def _add_controls(commands: argparse._SubParsersAction) -> None:
    _add_run_report(
        commands,
        "controls",
        "an oracle run beside its decoy run: how much of it a lottery gives",
        "cola db controls --store cola.db --run arc-mcts",
        CONTROLS_DETAILS,
        "controls",
        _controls_text,
    )


def _controls_text(result: Controls) -> str:
    """The decoy comparison, then every run's corrections at equal numbers of chains."""
    lines = [] if result.decoy is None else [_decoy_text(result.decoy), ""]
    return "\n".join([*lines, _at_k_text(result)])


def share_text(part: int, whole: int) -> str:
    """``39/51 (76.5%)``: a count and its share, ``-`` of nothing."""
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else "-"


def chains_text(count: int) -> str:
    """``21 chains``, ``1 chain``."""
    return f"{count} chain{'s' * (count != 1)}"


def _decoy_text(result: Lottery) -> str:
    """Gold and decoy side by side, then the difference that matters."""
    n = result.documents
    rows = [
        ("", "gold", "decoy"),
        (
            "full model gives it",
            share_text(result.gold_original, n),
            share_text(result.decoy_original, n),
        ),
        (
            "some chain gives it where the full model does not",
            share_text(result.gold.reached, result.gold.documents),
            share_text(result.decoy.reached, result.decoy.documents),
        ),
        (
            "the same, where the full model gives neither",
            share_text(result.gold_on_neither, result.neither),
            share_text(result.decoy_on_neither, result.neither),
        ),
    ]
    width = max(len(row[0]) for row in rows)
    runs = f"gold run {result.gold_run}, decoy run {result.decoy_run}"
    lines = [f"{runs}: {n} documents both finished"]
    lines += [f"  {a:<{width}}  {b:>16}  {c:>16}" for a, b, c in rows]
    lines.append(_above_lottery_text(result))
    return "\n".join(lines)


def _at_k_text(result: Controls) -> str:
    """Per run, the originally wrong documents corrected within its first k chains."""
    budgets = sorted({k for row in result.at_k for k in row.corrected})
    names = [_control_name(row) for row in result.at_k]
    width = max(22, *map(len, names))
    header = f"  {'run':<{width}}" + "".join(f"{f'@{k}':>18}" for k in budgets)
    lines = [
        f"originally wrong documents corrected within the first k chains after the full model, "
        f"on the {result.documents} documents every run below finished:",
        header,
    ]
    for name, row in zip(names, result.at_k, strict=True):
        cells = [
            share_text(row.corrected[k], row.documents) if k in row.corrected else "-"
            for k in budgets
        ]
        lines.append(f"  {name:<{width}}" + "".join(f"{c:>18}" for c in cells))
    lines.append("(the first row is the gold search itself; the others never see a score)")
    return "\n".join(lines)


def _control_name(row: AtK) -> str:
    """``menu (run 4)``, with its number of chains where it tries fewer than its budget's
    (a short menu), so that its "within k chains" is not read as k of them."""
    fewer = f", {chains_text(row.chains)}" if 0 < row.chains < max(row.corrected, default=0) else ""
    return f"{row.method} (run {row.run_id}{fewer})"


def _beside_text(result: RunStats) -> list[str]:
    """What chance alone gives beside the run's oracle figures, in a line per control; for a
    control run, the gold run it belongs to."""
    if result.control_of is not None:
        return [
            f"a control of run {result.control_of}: its oracle figures are chance's, compared "
            f"with the gold search's by: cola db controls --run {result.control_of}"
        ]
    if result.controls is None:
        return [
            "no controls yet: an oracle's corrections say nothing until set beside what chance "
            "gives; add them with cola search --target decoy (the same settings) or cola "
            f"controls random|menu --run {result.run_id}"
        ]
    controls = result.controls
    lines = [f"beside its controls (in full: cola db controls --run {result.run_id}):"]
    if controls.decoy is not None:
        lines.append(f"  {_above_lottery_text(controls.decoy)}")
    search, *unguided = controls.at_k
    ks = [max(row.corrected) for row in unguided if row.corrected]
    if ks and min(ks) in search.corrected:
        lines += _unguided_lines(controls, min(ks))
    return lines


def _unguided_lines(controls: Controls, k: int) -> list[str]:
    """The search against each unguided control within ``k`` chains after the full model."""
    rows = [
        (
            f"this search (run {row.run_id})" if i == 0 else _control_name(row),
            share_text(row.corrected[k], row.documents),
            share_text(row.shortened[k], row.right),
        )
        for i, row in enumerate(controls.at_k)
    ]
    width = max(len(row[0]) for row in rows)
    return [
        f"  within {k} chains after the full model, on the {controls.documents} documents "
        "every control finished:",
        f"    {'':<{width}}  {'wrong -> right':>18}  {'right, kept shorter':>20}",
        *(f"    {a:<{width}}  {b:>18}  {c:>20}" for a, b, c in rows),
    ]


def _above_lottery_text(result: Lottery) -> str:
    """Gold minus decoy where the full model gives neither, with its interval."""
    if result.above_lottery is None:
        return "corrections above the lottery: - (no document where the model gives neither)"
    low, high = result.interval
    return (
        f"corrections above the lottery: {100 * result.above_lottery:+.1f} points "
        f"[{100 * low:+.1f}, {100 * high:+.1f}] (paired 95% bootstrap interval, "
        f"{result.neither} documents; decoy run {result.decoy_run})"
    )


def _answers_text(result: RunStats) -> str:
    if result.mean_distinct_answers is None:
        return "not recorded (searched before schema 0003, or the task gives no answer)"
    counts = ", ".join(f"{n}: {documents}" for n, documents in result.answer_diversity.items())
    return f"{result.mean_distinct_answers:.2f} on average (documents by answers: {counts})"


def _work_text(result: RunStats) -> str:
    computed, limit = result.token_layer_applications, result.token_layer_limit
    if computed is None:
        return "not recorded (searched before schema 0002)"
    if not limit:
        return f"{computed:,}"
    return f"{computed:,} ({computed / limit:.2f}x the physical limit, {limit:,})"


def _layer_table(result: RunStats) -> str:
    from lm_eval_cola.store import frames

    rates = frames.layer_rates_frame(result).set_index("layer")
    rates.columns = ["usage", "skip", "repeat"]
    return rates.T.to_string(float_format=lambda x: f"{x:.2f}", line_width=100)


# -- compare ----------------------------------------------------------------------------------

COMPARE_DETAILS = """\
Does a search repeat? Two runs of one task (the same search on another machine, device, dtype
  or decoding mode, in the same store or another) are matched by document content and chain
  text, on the documents both finished. Every chain both evaluated on a document is a pair:
  how many pairs give a different answer (where both runs recorded it) or a different
  correctness, and the first differing pairs. Then the full model's agreement, and the rescues
  (documents the full model gets wrong in both runs that some chain corrects) each run finds
  and both find, beside what two independent draws of that many documents would share.
  Runs of different tasks, targets (gold or decoy) or model depths are refused."""


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "compare",
        "two runs of one task, chain by chain: where their answers differ",
        "cola db compare --store hf.db --run 1 --other_store bi.db --other_run 1",
        _compare,
        COMPARE_DETAILS,
    )
    parser.add_argument("--run", required=True, help="run id or name in --store")
    parser.add_argument("--other_run", required=True, help="run id or name in --other_store")
    parser.add_argument(
        "--other_store", help="SQLite path or SQLAlchemy URL of --other_run (default: --store)"
    )
    parser.add_argument(
        "--show", type=int, default=10, help="differing pairs to list (default: %(default)s)"
    )
    _add_result_format(parser)


def _compare(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import frames

    result = frames.compare(args.store, args.run, args.other_run, args.other_store, args.show)
    _print_result(result, args.format, functools.partial(_compare_text, args=args))


def _compare_text(result: Comparison, args: argparse.Namespace) -> str:
    """The two runs, the pairs' agreement, the full model's, the rescues', then the first
    differences."""
    verdict = "identical" if result.identical else "they differ"
    stores = (args.store, args.other_store or args.store)
    lines = [
        f"{result.task}, on the {result.documents} documents both runs finished:",
        *(f"  {_side_text(side, store)}" for side, store in zip(result.runs, stores, strict=True)),
        f"  chains both evaluated on a document: {result.common:,}; {verdict}",
        f"  answers compared (both recorded): {result.answers_compared:,}, differing: "
        f"{result.answers_differ:,}",
        f"  correctness differing: {result.correctness_differs:,}",
        f"  full model, same correctness: "
        f"{share_text(result.full_model_agrees, result.full_model_documents)}",
        f"  rescues, of the {result.wrong_in_both} documents the full model gets wrong in both: "
        f"{result.rescued[0]} and {result.rescued[1]}, {result.rescued_by_both} by both "
        f"({result.rescued_by_chance:.1f} if each run picked its own at random)",
    ]
    if result.differences:
        lines.append("first differing pairs (doc_id, chain: answers, correct):")
        lines += [
            f"  {pair.doc_id}, {pair.chain}: {pair.answers[0]!r} / {pair.answers[1]!r}, "
            f"{pair.correct[0]} / {pair.correct[1]}"
            for pair in result.differences
        ]
    return "\n".join(lines)


def _side_text(side: Side, store: str) -> str:
    name = f" ({side.name})" if side.name else ""
    return (
        f"run {side.run_id}{name} of {store}: {side.model} {side.dtype}, {side.method} budget "
        f"{side.budget}, decoding {side.decoding}; {side.evaluations:,} evaluations"
    )


# -- plot (``cola plot``) ----------------------------------------------------------------------

PLOT_KINDS = ("layers", "lengths", "pareto", "budget", "controls")
PLOT_DETAILS = """\
layers: per layer, mean applications in the best chains and the shares that skip and repeat
  it (the paper's Figures 5 and 6). lengths: lengths of the best correct chains, originally
  correct against originally wrong documents (Figure 2). pareto: score against chain length,
  for one document with --doc_id, else the share of documents with a correct chain of at most
  each length. budget: the share of documents with a correct chain within the first b
  evaluations, one curve per run (e.g. one run per search method), on the documents every
  run finished. controls: the first run's gold search beside what chance gives, on the
  documents all of them finished: originally wrong documents corrected within the first k
  chains, its decoy search reaching its wrong answer, each unguided control (cola controls
  random|menu) and, with --sampling, the model's own samples at each temperature; the title
  gives the corrections above the lottery. Without --kind, all five.

example, an oracle beside its controls:
  cola plot --store cola.db --run arc-gen --kind controls --sampling sampling.jsonl"""


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cola plot`` on the ``cola`` sub-commands."""
    parser = _command(
        subparsers,
        "plot",
        "write the paper's figures for runs of a store as PNG files",
        "cola plot --store cola.db --run 3 4 5 --output_dir figures/",
        _plot,
        details=PLOT_DETAILS,
        prefix="",
    )
    _add_runs_argument(parser)
    parser.add_argument("--kind", choices=PLOT_KINDS, action="append", help="(default: all)")
    parser.add_argument("--doc_id", type=int, help="pareto: one document instead of the run")
    parser.add_argument(
        "--sampling",
        action="append",
        default=[],
        help="controls: a cola controls sampling file of the run's model and task (repeatable)",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("figures"))


def _plot(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import frames, plots
    from lm_eval_cola.store.controls import read_samples

    samples = [read_samples(path) for path in args.sampling]
    with frames.opened(args.store) as store:
        run_ids = frames.resolve_runs(store, args.run)
        for kind in args.kind or PLOT_KINDS:
            print(plots.save(store, kind, run_ids, args.output_dir, args.doc_id, samples))


# -- sql --------------------------------------------------------------------------------------


def _add_sql(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "sql",
        "run one read-only SQL statement and print its result",
        'cola db sql --store cola.db "SELECT status, COUNT(*) FROM runs GROUP BY status"',
        _sql,
    )
    parser.add_argument("statement", help="one SQL statement; writes are refused")
    _add_format_arguments(parser, FORMATS)


def _sql(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import frames

    _write(frames.sql(args.store, args.statement), args.format, args.output, "rows")


# -- export -----------------------------------------------------------------------------------


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "export",
        "write whole tables to CSV or Parquet files",
        "cola db export --store cola.db --tables runs evaluations --format parquet "
        "--output_dir dump/",
        _export,
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        help="tables to export (default: every table of the store)",
    )
    parser.add_argument(
        "--format", choices=("csv", "parquet"), default="csv", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--output_dir", required=True, type=Path, help="folder for <table>.<format> files"
    )


def _export(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import frames

    tables = frames.tables(args.store, args.tables)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        path = args.output_dir / f"{name}.{args.format}"
        if args.format == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        print(f"{name}: {len(frame)} rows -> {path}")


# -- archive and restore ----------------------------------------------------------------------

ARCHIVE_DETAILS = """\
A long search survives a lost machine only as a file you keep: this writes a consistent
snapshot of an SQLite store (taken with SQLite's backup API, so a search may be writing to it
meanwhile) as gzipped SQL, ready to commit: the same store always gives the same bytes, so an
unchanged store changes nothing in git. `cola db restore` turns it back into a store that a search
resumes from. PostgreSQL stores are backed up with pg_dump instead."""


def _add_archive(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "archive",
        "write an SQLite store, everything in it, to one gzipped file",
        "cola db archive --store results/paper.db --output results/paper.db.gz",
        _archive,
        ARCHIVE_DETAILS,
    )
    parser.add_argument("--output", required=True, type=Path, help="the .db.gz file to write")


def _archive(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import archive

    size = archive.write(args.store, args.output)
    print(f"archived {args.store} -> {args.output} ({size / 2**20:.1f} MiB)")


def _add_restore(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "restore",
        "turn a `cola db archive` file back into an SQLite store",
        "cola db restore --archive results/paper.db.gz --store results/paper.db",
        _restore,
        "The store must not exist yet: a restore never overwrites one.",
    )
    parser.add_argument("--archive", required=True, type=Path, help="a .db.gz file")


def _restore(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import archive

    archive.restore(args.archive, args.store)
    print(f"restored {args.archive} -> {args.store}")


# -- upgrade ----------------------------------------------------------------------------------


def _add_upgrade(commands: argparse._SubParsersAction) -> None:
    _command(
        commands,
        "upgrade",
        "migrate a store to this release's schema",
        "cola db upgrade --store cola.db",
        _upgrade,
    )


def _upgrade(args: argparse.Namespace) -> None:
    from lm_eval_cola.store import engine as engines

    where = engines.display(engines.normalise_url(args.store))
    with engines.translated(args.store):
        if engines.is_current(args.store):
            print(f"store {where} is current (schema {engines.head_revision()})")
            return
        before, after = engines.upgrade_store(args.store)
    print(f"store {where} upgraded: schema {before} -> {after}")


# -- output -----------------------------------------------------------------------------------


def _write(frame: pd.DataFrame, fmt: str, output: Path | None, what: str) -> None:
    """``frame`` in ``fmt`` on stdout, or into ``output`` with a line that says so."""
    text = {
        "table": lambda: _table(frame),
        "csv": lambda: frame.to_csv(index=False),
        "json": lambda: frame.to_json(orient="records", date_format="iso", indent=2) + "\n",
    }[fmt]()
    if output is None:
        print(text, end="" if text.endswith("\n") else "\n")
        return
    output.write_text(text)
    print(f"{len(frame)} {what} -> {output}")


def _table(frame: pd.DataFrame) -> str:
    """A frame for the terminal: no index, shares rounded, missing values as ``-``."""
    if frame.empty:
        return "(no rows)"
    return frame.to_string(index=False, na_rep="-", float_format=lambda x: _number(x, DIGITS))


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
