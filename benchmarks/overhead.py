"""Overhead of ``--model cola`` against ``--model hf``, and of a chain per document, in one process.

Three backends are built once each: stock ``hf``; ``cola`` with the identity chain given
explicitly (the layer list is swapped, the arithmetic is the stock model's); and ``cola`` with a
different chain for every document (``chains=``: each document's requests packed into one row,
rows of different chains in one batch). They are timed round-robin, ``--repeats`` times. The
script prints the median wall time of each and the two ratios the project targets (identity <=
1.05x hf; per-document chains <= 1.05x identity, at the same batch size), and checks:

- the identity chain's results equal ``hf``'s exactly;
- every document gets the same answer (argmax) in the mixed batches as run alone, with its
  chain, and each log-likelihood is within 1e-5 of that (each row runs in layer calls of its
  own, so they are in fact equal bit for bit).

It exits with status 1 when a check fails.

Example (after ``cola data import --tasks arc_easy``):

    python benchmarks/overhead.py --limit 200 --batch_size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lm_eval_cola.chain import Chain
from lm_eval_cola.default_model import default_model_path
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.tasks import load_tasks, task_documents

TOLERANCE = 1e-5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/overhead.py --limit 200 --batch_size 8 --repeats 3",
    )
    parser.add_argument("--pretrained", default=None, help="model (default: embedded SmolLM2)")
    parser.add_argument("--task", default="arc_easy", help="a multiple-choice task")
    parser.add_argument("--include_path", help="extra folder of task YAMLs")
    parser.add_argument("--limit", type=int, default=200, help="documents")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per backend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args(argv)


def distinct_chains(n_docs: int, n_layers: int) -> list[Chain]:
    """A different full-depth chain per document: skip layer a, run layer b twice."""
    pairs = [(a, b) for a in range(1, n_layers) for b in range(1, n_layers) if a != b]
    chains = []
    for a, b in pairs[:n_docs]:
        layers = [i for i in range(n_layers) if i != a]
        layers.insert(layers.index(b) + 1, b)
        chains.append(Chain(tuple(layers)))
    return chains


def write_chains_file(plan: dict[str, Chain], task: str, folder: Path) -> str:
    path = folder / "chains.jsonl"
    with path.open("w") as out:
        for doc_hash, chain in plan.items():
            out.write(json.dumps({"task": task, "doc_hash": doc_hash, "chain": str(chain)}) + "\n")
    return str(path)


def timed(lm, args, tasks: TaskManager) -> tuple[float, dict[str, list[float]]]:
    """Wall time of one lm-eval run, and each document's log-likelihoods by ``doc_hash``."""
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[args.task], task_manager=tasks, limit=args.limit, log_samples=True
    )
    seconds = time.perf_counter() - start
    logliks = {
        s["doc_hash"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"][args.task]
    }
    return seconds, logliks


def alone(lm: ColaLM, documents, plan: dict[str, Chain]) -> dict[str, list[float]]:
    """Each document's log-likelihoods with its chain, in a batch of its own."""
    found = {}
    for document in documents:
        requests = document.instances
        result = lm.run_requests(
            "loglikelihood", requests, [plan[document.doc_hash]] * len(requests)
        )
        found[document.doc_hash] = [loglik for loglik, _ in result.outputs]
    return found


def check_per_document(batched: dict, single: dict) -> tuple[bool, bool, float]:
    """(log-likelihoods within the tolerance, same answer everywhere, largest difference)."""
    worst = max(
        abs(x - y) for key in single for x, y in zip(batched[key], single[key], strict=True)
    )
    same = all(_argmax(batched[key]) == _argmax(single[key]) for key in single)
    return worst <= TOLERANCE, same, worst


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pretrained = args.pretrained or default_model_path()
    common = dict(pretrained=pretrained, dtype=args.dtype, device=args.device,
                  batch_size=args.batch_size)  # fmt: skip
    tasks = TaskManager(include_path=args.include_path)
    backends = {"hf": HFLM(**common)}
    n_layers = backends["hf"].model.config.num_hidden_layers
    backends["cola identity"] = ColaLM(chain=str(Chain.identity(n_layers)), **common)
    task = load_tasks(args.task, args.include_path)[args.task]
    documents = task_documents(task, args.limit)
    plan = dict(
        zip([d.doc_hash for d in documents], distinct_chains(len(documents), n_layers), strict=True)
    )
    with tempfile.TemporaryDirectory() as folder:
        chains = write_chains_file(plan, args.task, Path(folder))
        backends["cola per-document"] = ColaLM(chains=chains, **common)
        times: dict[str, list[float]] = {name: [] for name in backends}
        logliks = {}
        for round_ in range(args.repeats):
            names = list(backends)[round_ % 3 :] + list(backends)[: round_ % 3]
            for name in names:
                seconds, logliks[name] = timed(backends[name], args, tasks)
                times[name].append(seconds)
                print(f"round {round_ + 1}: {name:18s} {seconds:7.2f} s", flush=True)
    single = alone(backends["cola per-document"], documents, plan)
    median = {name: statistics.median(values) for name, values in times.items()}
    identity_ratio = median["cola identity"] / median["hf"]
    per_doc_ratio = median["cola per-document"] / median["cola identity"]
    close, same, worst = check_per_document(logliks["cola per-document"], single)
    checks = {
        "identity results equal hf": logliks["cola identity"] == logliks["hf"],
        f"per-document log-likelihoods within {TOLERANCE:g} of each document alone": close,
        "per-document answers equal each document alone": same,
    }
    print(f"\n{args.limit} {args.task} documents, batch size {args.batch_size}, {args.dtype}, "
          f"{args.device}, median of {args.repeats} rounds")  # fmt: skip
    for name, seconds in median.items():
        print(f"  {name:18s} {seconds:7.2f} s")
    print(f"  identity / hf            {identity_ratio:.3f}  (target <= 1.05)")
    print(f"  per-document / identity  {per_doc_ratio:.3f}  (target <= 1.05)")
    print(f"  largest per-document difference to alone: {worst:.2e}")
    for check, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}: {check}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
