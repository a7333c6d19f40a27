"""MCTS's own cost per simulation, without a model: what the search adds to each evaluation.

A synthetic reward (a hash of the chain) stands in for the model, so the time is the tree's
alone: selection, creating a node's children (hundreds for a 30-layer model) and back-up. The
script prints milliseconds per simulation and a digest of every chain asked, so that two
versions of the tree can be checked to search exactly alike.

Example (SmolLM2's depth, the issue's budget):

    python benchmarks/mcts.py --layers 30 --budget 200 --searches 10
"""

from __future__ import annotations

import argparse
import hashlib
import time

from lm_eval_cola.chain import Chain
from lm_eval_cola.scoring import Trial
from lm_eval_cola.search import mcts
from lm_eval_cola.search.space import ChainSpace


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/mcts.py --layers 30 --budget 200 --searches 10",
    )
    parser.add_argument("--layers", type=int, default=30, help="the model's depth")
    parser.add_argument("--budget", type=int, default=200, help="simulations a search")
    parser.add_argument("--searches", type=int, default=10, help="searches, seeds 0, 1, ...")
    return parser.parse_args()


def synthetic(chain: Chain) -> Trial:
    """A reward in [0, 1) and a correctness that depend on the chain only, cheap to compute."""
    value = int.from_bytes(hashlib.blake2b(bytes(chain.layers), digest_size=4).digest(), "big")
    return Trial(chain, (value % 1000) / 1000, value % 3 == 0, {})


def main() -> None:
    args = parse_args()
    asked, seconds = hashlib.blake2b(digest_size=8), 0.0
    for seed in range(args.searches):
        searcher = mcts.MCTS(ChainSpace(args.layers), args.budget, seed=seed)
        start = time.perf_counter()
        for _ in range(args.budget):
            chain = searcher.ask()
            searcher.tell(synthetic(chain))
            asked.update(bytes(chain.layers))
        seconds += time.perf_counter() - start
    simulations = args.searches * args.budget
    print(f"MCTS over {args.layers} layers, {args.searches} searches of {args.budget} simulations")
    print(f"  {1000 * seconds / simulations:.3f} ms a simulation (reward included)")
    print(f"  chains asked: digest {asked.hexdigest()}")


if __name__ == "__main__":
    main()
