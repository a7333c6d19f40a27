"""What the hidden-state prefix cache saves: MCTS on ARC-Easy, with and without it, in one run.

The same search (MCTS, ``--budget`` simulations, same seeds) runs twice over the same documents,
once with the prefix cache off and once with ``--prefix_cache_mb`` of it. The script checks that
both find exactly the same chains with the same scores, then prints layer applications, wall
time and peak memory (resident set size of this process) and their ratios. Targets: at least 2x
fewer layer applications and 1.6x less wall time with the cache, peak memory under 4 GB.

Example (after ``cola data import --tasks arc_easy --data_dir ../shared/data/arc_easy``):

    python benchmarks/search.py --limit 20 --budget 200
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.tasks import TaskManager, get_task_dict
from sqlalchemy import select

from lm_eval_cola.lm import load
from lm_eval_cola.search.runner import SearchRun, SearchSettings
from lm_eval_cola.store.schema import Evaluation
from lm_eval_cola.store.store import Store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/search.py --limit 20 --budget 200",
    )
    parser.add_argument("--model_args", default="", help="cola model args (default: SmolLM2)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=20, help="documents searched")
    parser.add_argument("--budget", type=int, default=200, help="MCTS simulations a document")
    parser.add_argument("--prefix_cache_mb", type=float, default=1024)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def timed_search(lm, task, budget: int, limit: int, cache_mb: float, folder: str):
    """(seconds, layer applications, every evaluation) of one search over the documents."""
    settings = SearchSettings(method="mcts", budget=budget, limit=limit)
    before = lm.executor.layer_applications
    start = time.perf_counter()
    with Store(os.path.join(folder, f"cache{cache_mb:g}.db")) as store:
        run = SearchRun(lm, task, store, settings, prefix_cache_mb=cache_mb)
        run_id = run.run()
        seconds = time.perf_counter() - start
        with store.session() as session:
            rows = session.execute(
                select(Evaluation.document_id, Evaluation.chain, Evaluation.score).where(
                    Evaluation.run_id == run_id
                )
            )
            found = sorted(rows.all())
    return seconds, lm.executor.layer_applications - before, found


def main() -> None:
    args = parse_args()
    lm = load(args.model_args, args.device)
    task = get_task_dict([args.task], TaskManager())[args.task]
    task.set_config(key="num_fewshot", value=0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for cache_mb in (0.0, args.prefix_cache_mb):
            results[cache_mb] = timed_search(lm, task, args.budget, args.limit, cache_mb, folder)
            seconds, applications, _ = results[cache_mb]
            print(f"prefix cache {cache_mb:g} MB: {seconds:.1f} s, {applications:,} layer "
                  f"applications", flush=True)  # fmt: skip
    (plain_s, plain_n, plain_found), (cached_s, cached_n, cached_found) = results.values()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nMCTS, {args.budget} simulations on {args.limit} {args.task} documents, {args.device}")
    print(f"  same chains and scores with and without the cache: {plain_found == cached_found}")
    print(f"  layer applications  {plain_n / cached_n:.2f}x fewer with the cache (target >= 2)")
    print(f"  wall time           {plain_s / cached_s:.2f}x less with the cache (target >= 1.6)")
    print(f"  peak memory         {peak_gb:.2f} GB (target < 4)")


if __name__ == "__main__":
    main()
