"""Search against its physical limit: the same MCTS three ways over the same documents, in one run.

1. naive: every request of every evaluation as a row of its own through HFLM's code, one
   document and one chain at a time, nothing reused (the path ``--model cola chain=...``
   takes);
2. new: each document's requests packed into one row (shared context once) and every chain
   prefix computed once per document (prefix cache), one document at a time (for generation,
   with the chains the MCTS will ask next, on a guess of the pending one's score, decoded
   beside it: ``benchmarks/look_ahead.py``);
3. new with ``--parallel_docs`` documents per forward pass;
4. on a CPU of several cores, the same in ``--workers`` processes of one thread each (one a
   core by default), every process with ``--parallel_docs`` of its own (search/workers.py),
   against the same checks.

On a generation task all three decode batch-invariantly (the search's default: every path
stores the same tokens), and a fourth run, **hf decoding**, searches as the release before
did (``--decoding hf``: HF's ``generate`` a chain at a time, prefix cache, ``--parallel_docs``),
for documents per minute against it and how often its answers agree.

The script checks that all three store the same chains with the same correctness and scores
(within 1e-5) and, for generation, the same answers, then prints token-layer applications
(token positions x layers, padding included) against naive and against the physical limit
(each distinct chain prefix once over each document's distinct token positions), wall time,
forward passes per 100 evaluations and peak memory, with the issue's targets, and the compute
floor: the physical limit at the model's own prefill rate, measured in the same run. It exits with
status 1 when a check fails.

Example (after ``cola data import --tasks arc_easy``):

    python benchmarks/search.py --limit 20 --budget 200 --parallel_docs 16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sqlalchemy import func, select

from lm_eval_cola.executor import Work
from lm_eval_cola.lm import load
from lm_eval_cola.search.runner import SearchRun, SearchSettings
from lm_eval_cola.store.schema import Evaluation, RunDocument
from lm_eval_cola.store.store import Store
from lm_eval_cola.tasks import load_tasks

TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/search.py --limit 20 --budget 200 --parallel_docs 16",
    )
    parser.add_argument("--model_args", default="", help="cola model args (default: SmolLM2)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--include_path", help="a folder of your own lm-eval task YAMLs")
    parser.add_argument("--limit", type=int, default=20, help="documents searched")
    parser.add_argument("--budget", type=int, default=200, help="MCTS simulations a document")
    parser.add_argument("--parallel_docs", type=int, default=16)
    parser.add_argument("--prefix_cache_mb", type=float, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--workers",
        type=int,
        help="also search in this many processes of one thread (default on a CPU: one a core; "
        "1: not at all)",
    )
    parser.add_argument(
        "--skip_naive", action="store_true", help="only the new path (no ratios to naive)"
    )
    return parser.parse_args(argv)


@dataclasses.dataclass
class Measured:
    seconds: float
    work: Work
    rows: list[tuple]  #: (document, chain, correct, score, response) per evaluation
    limit: int | None  #: the physical limit of these searches

    @property
    def evaluations(self) -> int:
        return len(self.rows)


def measured_search(lm, task, args, folder: str, name: str, decoding=None, **how) -> Measured:
    """Search the documents into a new store and read back what it recorded."""
    shared = how.pop("shared_context", True)
    settings = SearchSettings("mcts", args.budget, limit=args.limit, decoding=decoding)
    with Store(os.path.join(folder, f"{name}.db")) as store:
        run = SearchRun(lm, task, store, settings, **how)
        run.objective.options = dataclasses.replace(run.objective.options, shared_context=shared)
        before, start = dataclasses.replace(lm.executor.work), time.perf_counter()
        run_id = run.run()
        seconds, work = time.perf_counter() - start, lm.executor.work - before
        with store.session() as session:
            found = session.execute(
                select(Evaluation.document_id, Evaluation.chain, Evaluation.correct,
                       Evaluation.score, Evaluation.response).where(Evaluation.run_id == run_id)
            )  # fmt: skip
            limit = session.scalar(
                select(func.sum(RunDocument.token_layer_limit)).where(RunDocument.run_id == run_id)
            )
            rows = sorted(found.all())
    print(f"{name}: {seconds:.1f} s, {work}", flush=True)
    return Measured(seconds, work, rows, limit)


def seconds_per_token_layer(lm, rows: int = 8, tokens: int = 128, repeats: int = 3) -> float:
    """The model's own rate over prompt tokens: a stock forward pass (no chain, no KV cache,
    the last token's logits only) on a full batch, best of ``repeats``. The physical limit at
    this rate is the search's compute floor: what it would cost if every token-layer ran at
    the model's best prefill speed, with no padding and no bookkeeping."""
    model = lm.executor.model
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), device=model.device)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best / (rows * tokens * lm.executor.n_layers)


def same_searches(a: Measured, b: Measured) -> bool:
    """The same chains on the same documents, the same correctness and answers, scores within
    1e-5."""
    if [row[:3] + row[4:] for row in a.rows] != [row[:3] + row[4:] for row in b.rows]:
        return False
    return all(abs(x[3] - y[3]) <= TOLERANCE for x, y in zip(a.rows, b.rows, strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is None:
        args.workers = len(os.sched_getaffinity(0)) if args.device == "cpu" else 1
    lm = load(args.model_args, args.device)
    task = load_tasks(args.task, args.include_path)[args.task]
    runs: dict[str, Measured] = {}
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_naive:
            runs["naive"] = measured_search(
                lm, task, args, folder, "naive", shared_context=False, look_ahead=0
            )
        cache = args.prefix_cache_mb
        runs["new"] = measured_search(lm, task, args, folder, "new", prefix_cache_mb=cache)
        runs["parallel"] = measured_search(
            lm, task, args, folder, f"new, {args.parallel_docs} documents at a time",
            prefix_cache_mb=cache, parallel_docs=args.parallel_docs,
        )  # fmt: skip
        if args.workers > 1:
            runs["workers"] = measured_search(
                lm, task, args, folder,
                f"new, {args.workers} workers of {args.parallel_docs} documents at a time",
                prefix_cache_mb=cache, parallel_docs=args.parallel_docs, workers=args.workers,
            )  # fmt: skip
        if task.get_config("output_type") == "generate_until" and not args.skip_naive:
            runs["hf"] = measured_search(
                lm, task, args, folder, "hf decoding", decoding="hf",
                prefix_cache_mb=cache, parallel_docs=args.parallel_docs,
            )  # fmt: skip
        floor = runs["new"].limit * seconds_per_token_layer(lm)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    worker_peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    new, parallel = runs["new"], runs["parallel"]
    checks = {"parallel documents search exactly as one at a time": same_searches(new, parallel)}
    if "workers" in runs:
        checks["workers search exactly as one at a time"] = same_searches(new, runs["workers"])
    print(f"\nMCTS, {args.budget} simulations, {args.limit} {args.task} documents, {args.device}")
    print(f"  evaluations: {new.evaluations:,}; physical limit: {new.limit:,} token-layers")
    if "naive" in runs:
        naive = runs["naive"]
        checks["the new path finds what the naive path finds"] = same_searches(naive, new)
        print(f"  limit / naive token-layers               {new.limit / _tokens(naive):.3f}")
        print(f"  token-layers  new / naive                {_tokens(new) / _tokens(naive):.3f}"
              "  (target <= 0.22)")  # fmt: skip
        print(f"  wall time     new / naive                {new.seconds / naive.seconds:.3f}"
              "  (target <= 0.3)")  # fmt: skip
        print(f"  wall time     parallel / naive           {parallel.seconds / naive.seconds:.3f}")
        if "workers" in runs:
            print(f"  wall time     {args.workers} workers / naive          "
                  f"{runs['workers'].seconds / naive.seconds:.3f}")  # fmt: skip
    print(f"  token-layers  new / limit                {_tokens(new) / new.limit:.3f}"
          "  (target <= 1.15)")  # fmt: skip
    print(
        f"  token-layers  parallel / limit           {_tokens(parallel) / new.limit:.3f}"
        f"  (of which padding {parallel.work.padding_token_layers / new.limit:.3f})"
    )
    print(
        f"  compute floor (the limit at the model's prefill rate)  {floor:.1f} s: "
        f"parallel / floor {parallel.seconds / floor:.2f}"
        + (f", workers / floor {runs['workers'].seconds / floor:.2f}" if "workers" in runs else "")
        + (f", floor / naive {floor / runs['naive'].seconds:.3f}" if "naive" in runs else "")
    )
    calls = [r.work.forward_calls * 100 / r.evaluations for r in (new, parallel)]
    print(f"  forward passes per 100 evaluations       {calls[0]:.1f} one at a time, "
          f"{calls[1]:.1f} with {args.parallel_docs}: {calls[1] / calls[0]:.3f}"
          "  (target <= 1/8)")  # fmt: skip
    layers = [r.work.layer_calls / r.evaluations for r in (new, parallel)]
    print(f"  layer calls per evaluation               {layers[0]:.1f} one at a time, "
          f"{layers[1]:.1f} with {args.parallel_docs}")  # fmt: skip
    print(f"  wall time     parallel / one at a time   {parallel.seconds / new.seconds:.3f}")
    per_minute = [60 * args.limit / r.seconds for r in (new, parallel)]
    print(f"  documents searched per minute            {per_minute[0]:.1f} one at a time, "
          f"{per_minute[1]:.1f} with {args.parallel_docs}")  # fmt: skip
    if "hf" in runs:
        before = runs["hf"]
        speedup = before.seconds / parallel.seconds
        print(f"  documents per minute  parallel / hf decoding  {speedup:.2f}  (target >= 3)")
        if "workers" in runs:
            print(f"  documents per minute  {args.workers} workers / hf decoding "
                  f"{before.seconds / runs['workers'].seconds:.2f}")  # fmt: skip
        found = {row[:3] + row[4:] for row in before.rows}
        agree = sum(row[:3] + row[4:] in found for row in new.rows)
        print(f"  hf decoding: {before.seconds:.1f} s; evaluations it shares with the new path "
              f"(chain, correctness, answer): {agree}/{len(new.rows)}")  # fmt: skip
    print(f"  peak memory                              {peak_gb:.2f} GB"
          + (f" (a worker: {worker_peak_gb:.2f} GB)" if "workers" in runs else ""))  # fmt: skip
    for check, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}: {check}")
    return 0 if all(checks.values()) else 1


def _tokens(run: Measured) -> int:
    return run.work.token_layer_applications


if __name__ == "__main__":
    sys.exit(main())
