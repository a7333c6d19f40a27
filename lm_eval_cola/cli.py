"""The ``cola`` command: one sub-command per job, each defined next to the code it runs.

Every sub-command module exposes ``add_parser(subparsers)``, which registers its parser (made
with :func:`add_command`) and sets ``func`` to the function that runs it. ``cola lm_eval ...``
is the stock lm-eval CLI with ``--model cola`` registered, for environments where ``.pth``
files are not processed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lm_eval_cola import logs
from lm_eval_cola.errors import ColaError, report
from lm_eval_cola.logs import LEVELS

EPILOG = """examples:
  cola search --tasks arc_easy --method mcts --budget 200 --limit 100 --store cola.db
  cola search --tasks arc_easy --limit 100 --budget 50 --target decoy --store cola.db
  cola controls random --store cola.db --run 1 --k 50
  cola db controls --store cola.db --run 1
  cola data import --tasks arc_easy   (ARC-Easy ships with the package)
  cola db stats --store cola.db --run 1
  cola plot --store cola.db --run 1 2 --output_dir figures/
  cola predict train --store cola.db --run 2 --output_dir predictors/
  cola refingerprint --store cola.db   (results stored before the full weights fingerprint)
  cola lm_eval --model cola --model_args chain=0-11.11-29 --tasks arc_easy --limit 20
"""


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str | None = None,
    doc: str | None = None,
    epilog: str | None = None,
    **kwargs,
) -> argparse.ArgumentParser:
    """A sub-command's parser whose description and examples keep their line breaks (every
    command's ``--help`` ends with examples); ``doc``, a module's docstring, gives the
    description its first paragraph."""
    if doc is not None:
        kwargs["description"] = doc.split("\n\n")[0]
    return subparsers.add_parser(
        name,
        help=help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def add_model_args(parser, whose: str = "cola/hf model args") -> None:
    """``--model_args`` and ``--device``, as every command that loads a model takes them
    (``parser`` may be an argument group)."""
    parser.add_argument(
        "--model_args", default="", help=f"{whose}, as for lm_eval (default: SmolLM2)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if any, else cpu)"
    )


def check_model_args(args: argparse.Namespace) -> None:
    """``--model_args`` checked before anything loads: names, chains, sources (one line)."""
    from lm_eval_cola.model_args import parse, preflight

    preflight(parse(args.model_args))


def load_model(args: argparse.Namespace):
    """The ``cola`` model of ``--model_args`` on ``--device``."""
    from lm_eval_cola.lm import load

    return load(args.model_args, args.device)


def build_parser() -> argparse.ArgumentParser:
    from lm_eval_cola import data_import, refingerprint
    from lm_eval_cola.predict import cli as predict_cli
    from lm_eval_cola.search import cli as search_cli
    from lm_eval_cola.search import controls as controls_cli
    from lm_eval_cola.store import cli as store_cli
    from lm_eval_cola.store import report

    parser = argparse.ArgumentParser(
        prog="cola",
        description="Chains of layers (CoLa) for lm-evaluation-harness.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data = sub.add_parser(
        "data", help="prepare data sets for offline runs", description="Prepare data sets."
    )
    data_import.add_parser(
        data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    )
    store_cli.add_parser(sub)
    store_cli.add_plot_parser(sub)
    search_cli.add_parser(sub)
    controls_cli.add_parser(sub)
    report.add_parser(sub)
    predict_cli.add_parser(sub)
    refingerprint.add_parser(sub)
    for command in _leaf_parsers(parser):
        command.add_argument(
            "--verbosity",
            default="WARNING",
            choices=LEVELS,
            help="messages of other libraries (lm-eval, datasets, Alembic, Optuna, ...) shown "
            "from this level; this package's own notes always show (default: WARNING)",
        )
    sub.add_parser(
        "lm_eval",
        help="the stock lm-eval CLI with --model cola registered",
        description="Runs lm-eval's own CLI; every argument after 'lm_eval' is passed to it.",
        add_help=False,
    )
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command that runs something (``cola search``, ``cola db stats``)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [parser]
    return [
        leaf
        for group in groups
        for child in group.choices.values()
        for leaf in _leaf_parsers(child)
    ]


def run_lm_eval(argv: Sequence[str]) -> int:
    """Run lm-eval's CLI in this process after registering the ``cola`` backend."""
    from lm_eval_cola import _hook

    _hook.register_now()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm_eval"]:
        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    logs.setup(args.verbosity)
    try:
        return int(args.func(args) or 0)
    except ColaError as err:
        return report(f"cola {args.command}", err)


if __name__ == "__main__":
    sys.exit(main())
