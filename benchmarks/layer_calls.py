"""Layer calls a forward pass takes for chains of a stored search, in the executor's order
(the lowest layer first, looking one call ahead) against the lowest layer first alone and
running the layer most rows need next (the orders before).

Each call of a layer reads all its weights, so on a decoding step (a token a row) the calls,
not the tokens, are the cost. Chains are drawn from a run's evaluations in groups of
``--rows``, as ``--parallel_docs`` documents put them in one pass; every chain starts at its
first layer (a pass with nothing in the prefix cache). The script counts work, no model runs.

Example (a combined-space MCTS run of the paper's protocol):

    python benchmarks/layer_calls.py --store results/paper.db --run 1 --rows 4 16 32
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from sqlalchemy import select

from lm_eval_cola.chain import Chain
from lm_eval_cola.executor.rows import layer_calls, lowest_first_calls, rows_by_next_layer
from lm_eval_cola.store.schema import Evaluation
from lm_eval_cola.store.store import Store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/layer_calls.py --store results/paper.db --run 1 "
        "--rows 4 16 32",
    )
    parser.add_argument("--store", required=True, help="a store (SQLite path or URL)")
    parser.add_argument("--run", type=int, required=True, help="the run whose chains to draw")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--groups", type=int, default=500, help="groups drawn per size")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def most_rows_first(chains: Sequence[Chain]) -> int:
    """The calls of the order before: the layer most rows need next, the lowest of equals."""
    done, calls = [0] * len(chains), 0
    while waiting := rows_by_next_layer(chains, done):
        _, rows = max(waiting.items(), key=lambda item: (len(item[1]), -item[0]))
        calls += 1
        for r in rows:
            done[r] += 1
    return calls


def main() -> None:
    args = parse_args()
    with Store(args.store) as store, store.session() as session:
        texts = session.scalars(select(Evaluation.chain).where(Evaluation.run_id == args.run))
        chains = [Chain.parse(text) for text in texts]
    if not chains:
        raise SystemExit(f"run {args.run} has no evaluations in {args.store}: pick another --run")
    rng = random.Random(args.seed)
    print(f"{len(chains):,} chains of run {args.run}; layer calls a pass, mean of {args.groups}")
    for size in args.rows:
        groups = [rng.choices(chains, k=size) for _ in range(args.groups)]
        now = sum(sum(1 for _ in layer_calls(g, [0] * size)) for g in groups) / args.groups
        lowest = sum(lowest_first_calls(g, [0] * size) for g in groups) / args.groups
        most = sum(most_rows_first(g) for g in groups) / args.groups
        longest = sum(max(map(len, g)) for g in groups) / args.groups
        rows = sum(sum(map(len, g)) for g in groups) / args.groups / now
        print(f"  {size:3d} rows: {now:6.1f} looking one call ahead ({rows:.1f} rows a call), "
              f"{lowest:6.1f} lowest layer first ({lowest / now:.2f}x), {most:6.1f} most rows "
              f"first ({most / now:.2f}x), longest chain {longest:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
