"""A generated-answer search at several look-ahead depths and the hf path, in one run.

A search decodes, beside each document's pending chain, the chains its method will ask next if
the pending one scores as most of the document's chains did (``SearchRun(look_ahead=N)``, up
to N chains a document; ``LOOK_AHEAD`` by default, 0 for none). The script searches the same
documents at each depth (batch-invariant decoding, prefix cache, ``--parallel_docs``, in
``--workers`` processes) and once with HF's decoding (``--decoding hf``, one process), checks
that every depth stores the same chains, correctness, answers and scores, and prints wall
time, forward passes, token-layers against the physical limit, layer applications (a failed
guess's chains included) and documents a minute against the hf path. It exits with status 1
when a check fails.

Example (after ``cola data import --tasks gsm8k_direct --data_dir ../shared/data/gsm8k``):

    python benchmarks/look_ahead.py --task gsm8k_direct --limit 8 --budget 20 --parallel_docs 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import search as bench  # benchmarks/search.py: run as a script, this folder comes first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/look_ahead.py --task gsm8k_direct --limit 8 "
        "--budget 20 --parallel_docs 8",
    )
    parser.add_argument("--model_args", default="", help="cola model args (default: SmolLM2)")
    parser.add_argument("--task", default="gsm8k_direct", help="a generated-answer task")
    parser.add_argument("--include_path", help="a folder of your own lm-eval task YAMLs")
    parser.add_argument("--limit", type=int, default=8, help="documents searched")
    parser.add_argument("--budget", type=int, default=20, help="MCTS simulations a document")
    parser.add_argument("--parallel_docs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="processes of one thread")
    parser.add_argument("--prefix_cache_mb", type=float, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depths", default="0,1,3,6", help="comma-separated look-ahead depths")
    parser.add_argument("--skip_hf", action="store_true", help="no hf-decoding run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lm = bench.load(args.model_args, args.device)
    task = bench.load_tasks(args.task, args.include_path)[args.task]
    how = {"prefix_cache_mb": args.prefix_cache_mb, "parallel_docs": args.parallel_docs}
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for depth in (int(d) for d in args.depths.split(",")):
            runs[f"{depth} ahead"] = bench.measured_search(
                lm, task, args, folder, f"ahead{depth}", look_ahead=depth,
                workers=args.workers, **how,
            )  # fmt: skip
        if not args.skip_hf:
            runs["hf"] = bench.measured_search(lm, task, args, folder, "hf", decoding="hf", **how)
    for name, run in runs.items():
        work = run.work
        print(
            f"{name}: {run.seconds:.1f} s, {work.forward_calls} passes, "
            f"{work.layer_calls} layer calls, "
            f"{work.token_layer_applications / run.limit:.3f} of the limit's token-layers "
            f"({run.limit}), {work.layer_applications} layer applications, "
            f"{run.evaluations} evaluations"
        )
    depths = [name for name in runs if name != "hf"]
    same = all(bench.same_searches(runs[name], runs[depths[0]]) for name in depths[1:])
    print(("PASS" if same else "FAIL") + ": every depth stores the same evaluations")
    if "hf" in runs:
        for name in depths:
            ratio = runs["hf"].seconds / runs[name].seconds
            print(f"documents a minute, {name} / hf: {ratio:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
