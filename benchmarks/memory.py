"""A search's peak memory against what its prefix cache counts, handing freed pages back to the
system at most every 10 s (:func:`return_freed_memory`), after each forward pass, or never.

Each variant runs in a fresh process (an allocator's holes outlive the search that made them),
one after the other, and prints its wall time, its system time and minor page faults (what
handing pages back costs: each page taken back is faulted in again, zeroed), peak resident
memory, the bytes the prefix cache counted at the end, and the peak over (cache + model
weights).

Example (after ``cola data import --tasks gsm8k_direct``):

    python benchmarks/memory.py --task gsm8k_direct --limit 8 --budget 50 --parallel_docs 8
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VARIANTS = ("trim at most every 10 s", "trim after each forward pass", "no trim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/memory.py --task gsm8k_direct --limit 8 --budget 50 "
        "--parallel_docs 8",
    )
    parser.add_argument("--task", default="gsm8k_direct")
    parser.add_argument("--limit", type=int, default=8, help="documents searched")
    parser.add_argument("--budget", type=int, default=50, help="MCTS simulations a document")
    parser.add_argument("--parallel_docs", type=int, default=8)
    parser.add_argument("--prefix_cache_mb", type=float, default=4096)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One search in this process: its seconds, peak memory and the cache's count (GB)."""
    from lm_eval_cola import scoring
    from lm_eval_cola.lm import load
    from lm_eval_cola.search.runner import SearchRun, SearchSettings
    from lm_eval_cola.store.store import Store
    from lm_eval_cola.tasks import load_tasks

    if args.variant == VARIANTS[1]:
        scoring.return_freed_memory = functools.partial(scoring.return_freed_memory, every_s=0)
    elif args.variant == VARIANTS[2]:
        scoring.return_freed_memory = lambda: None
    lm = load("", "cpu")
    task = load_tasks(args.task)[args.task]
    weights = sum(p.numel() * p.element_size() for p in lm.executor.model.parameters())
    with tempfile.TemporaryDirectory() as folder, Store(os.path.join(folder, "m.db")) as store:
        settings = SearchSettings("mcts", args.budget, limit=args.limit)
        run = SearchRun(
            lm, task, store, settings,
            prefix_cache_mb=args.prefix_cache_mb, parallel_docs=args.parallel_docs,
        )  # fmt: skip
        start = time.perf_counter()
        run.run()
        seconds = time.perf_counter() - start
    cached = run.objective.options.prefix_cache.bytes
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "peak": usage.ru_maxrss * 1024 / 2**30, "cache": cached / 2**30,
            "weights": weights / 2**30, "system": usage.ru_stime,
            "faults": usage.ru_minflt / 1e6}  # fmt: skip


def main() -> int:
    args = parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return 0
    print(
        f"MCTS, {args.budget} simulations, {args.limit} {args.task} documents, "
        f"{args.parallel_docs} at a time, --prefix_cache_mb {args.prefix_cache_mb:g}"
    )
    for variant in VARIANTS:
        found = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        m = json.loads(found.stdout.strip().splitlines()[-1])
        ratio = m["peak"] / (m["cache"] + m["weights"])
        print(f"  {variant:<30} {m['seconds']:7.1f} s  system {m['system']:5.1f} s  "
              f"{m['faults']:6.2f} M faults  peak {m['peak']:5.2f} GB  cache {m['cache']:5.2f} GB"
              f"  peak / (cache + weights) {ratio:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
