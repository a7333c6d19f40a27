"""Write and query speed of the chain store on SQLite, at the size of a real search.

Writes ``--documents`` documents × ``--evaluations`` chain evaluations (200 × 1,000 = 200k rows
by default) into a new SQLite store the way a search does, one ``record_document`` transaction
(a batched insert) per document, then times the SQL ``stats`` of the run and the oracle ``pick``
on it. Prints rows per second and query times against the project's targets: ≥ 20,000 rows/s,
stats and pick under 2 s each at 200k rows.

Example:

    python benchmarks/store.py --documents 200 --evaluations 1000
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lm_eval_cola.chain import Chain
from lm_eval_cola.fingerprint import ModelIdentity
from lm_eval_cola.store import queries
from lm_eval_cola.store.store import DocumentInfo, EvaluationInfo, RunInfo, Store, TaskInfo

ROWS_PER_S, QUERY_S = 20_000, 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/store.py --documents 200 --evaluations 1000",
    )
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--evaluations", type=int, default=1000, help="chains per document")
    parser.add_argument("--layers", type=int, default=30, help="model depth (SmolLM2: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each query")
    parser.add_argument("--store", help="SQLite file to create (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def chains(count: int, n_layers: int, rng: random.Random) -> list[Chain]:
    """``count`` distinct chains of the kind a search tries: the identity, then the model's
    layers with a few skipped and a few repeated."""
    found = {Chain.identity(n_layers)}
    while len(found) < count:
        layers = []
        for layer in range(n_layers):
            roll = rng.random()
            layers += [] if roll < 0.1 else [layer, layer] if roll > 0.9 else [layer]
        if layers:
            found.add(Chain(tuple(layers)))
    return sorted(found, key=str)


def evaluations(pool: list[Chain], rng: random.Random) -> list[EvaluationInfo]:
    """One document's results: every chain of the pool with a random score."""
    rows = []
    for chain in pool:
        score = rng.random()
        rows.append(
            EvaluationInfo(
                chain=str(chain),
                length=len(chain),
                metrics={"acc": float(score > 0.5), "acc_norm": score},
                score=score,
                correct=score > 0.5,
                layer_applications=len(chain) * 40,
                seconds=0.01,
            )
        )
    return rows


def setup(store: Store, args: argparse.Namespace) -> tuple[int, list[int]]:
    """A model, a task, its documents and a run: what a search registers before it starts."""
    digest = hashlib.sha256(b"benchmark").hexdigest()
    model_id = store.model(
        ModelIdentity("benchmark", None, "llama", args.layers, "bfloat16", digest)
    )
    task_id = store.task(TaskInfo("arc_easy", "1.0", digest, "test", "multiple_choice"))
    docs = [
        DocumentInfo(hashlib.sha256(str(i).encode()).hexdigest(), i, {"q": f"question {i}"})
        for i in range(args.documents)
    ]
    ids = store.documents(task_id, docs)
    info = RunInfo("grid", args.evaluations, args.seed, args.documents)
    return store.start_run(model_id, task_id, info), [ids[d.doc_hash] for d in docs]


def timed(query: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first, median of all) seconds: the first run reads a cold page cache of this process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        query()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    folder = tempfile.TemporaryDirectory()
    path = args.store or str(Path(folder.name) / "store.db")
    pool = chains(args.evaluations, args.layers, rng)
    results = [evaluations(pool, rng) for _ in range(args.documents)]
    rows = args.documents * args.evaluations

    with Store(path) as store:
        run_id, ids = setup(store, args)
        start = time.perf_counter()
        for document_id, document_results in zip(ids, results, strict=True):
            store.record_document(run_id, document_id, document_results, seconds=1.0)
        write_s = time.perf_counter() - start
        store.finish_run(run_id)

    with Store(path, read_only=True) as store, store.session() as session:
        stats_s = timed(lambda: queries.stats(session, run_id), args.repeats)
        pick_s = timed(lambda: queries.pick(session, [run_id]), args.repeats)
        picked = len(queries.pick(session, [run_id]))

    rate = rows / write_s
    size_mb = Path(path).stat().st_size / 1e6
    print(f"store: {path} ({size_mb:.1f} MB, {args.documents} documents × {args.evaluations})")
    print(
        f"write: {rows:,} rows in {write_s:.2f} s = {rate:,.0f} rows/s, one transaction a "
        f"document (target ≥ {ROWS_PER_S:,}: {verdict(rate >= ROWS_PER_S)})"
    )
    for name, (first, median) in (("stats", stats_s), ("pick", pick_s)):
        print(
            f"{name}: first {first:.3f} s, median of {args.repeats} {median:.3f} s "
            f"(target < {QUERY_S} s: {verdict(max(first, median) < QUERY_S)})"
        )
    print(f"pick chose {picked} chains, one per document")
    folder.cleanup()


if __name__ == "__main__":
    main()
