"""Overhead of ``--model cola`` against ``--model hf`` on ARC-Easy, measured in one process.

Three backends are built once each: stock ``hf``; ``cola`` with the identity chain given
explicitly (the layer list is swapped, the arithmetic is the stock model's); and ``cola`` with a
different chain for every document (all as long as the model is deep, so only the grouping
costs). They are timed round-robin, ``--repeats`` times, and the script prints the median wall
time of each and the two ratios the project targets: identity ≤ 1.05× hf, per-document chains
≤ 1.5× identity, at the same batch size.

Example (after ``cola data import --tasks arc_easy --data_dir ../shared/data/arc_easy``):

    python benchmarks/overhead.py --limit 200 --batch_size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict

from lm_eval_cola.chain import Chain
from lm_eval_cola.default_model import default_model_path
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.sources import doc_hash

TASK = "arc_easy"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/overhead.py --limit 200 --batch_size 8 --repeats 3",
    )
    parser.add_argument("--pretrained", default=None, help="model (default: embedded SmolLM2)")
    parser.add_argument("--limit", type=int, default=200, help="ARC-Easy test documents")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per backend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args()


def distinct_chains(n_docs: int, n_layers: int) -> list[Chain]:
    """A different full-depth chain per document: skip layer a, run layer b twice."""
    pairs = [(a, b) for a in range(1, n_layers) for b in range(1, n_layers) if a != b]
    chains = []
    for a, b in pairs[:n_docs]:
        layers = [i for i in range(n_layers) if i != a]
        layers.insert(layers.index(b) + 1, b)
        chains.append(Chain(tuple(layers)))
    return chains


def write_chains_file(tasks: TaskManager, limit: int, n_layers: int, folder: Path) -> str:
    task = get_task_dict([TASK], tasks)[TASK]
    docs = list(task.eval_docs)[:limit]
    path = folder / "chains.jsonl"
    with path.open("w") as out:
        for doc, chain in zip(docs, distinct_chains(len(docs), n_layers), strict=True):
            out.write(json.dumps({"task": TASK, "doc_hash": doc_hash(doc), "chain": str(chain)}))
            out.write("\n")
    return str(path)


def timed(lm, tasks: TaskManager, limit: int) -> tuple[float, dict]:
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=tasks, limit=limit, log_samples=True
    )
    seconds = time.perf_counter() - start
    scores = {s["doc_id"]: s["resps"] for s in out["samples"][TASK]}
    return seconds, scores


def main() -> None:
    args = parse_args()
    pretrained = args.pretrained or default_model_path()
    common = dict(pretrained=pretrained, dtype=args.dtype, device=args.device,
                  batch_size=args.batch_size)  # fmt: skip
    tasks = TaskManager()
    backends = {"hf": HFLM(**common)}
    n_layers = backends["hf"].model.config.num_hidden_layers
    backends["cola identity"] = ColaLM(chain=str(Chain.identity(n_layers)), **common)
    with tempfile.TemporaryDirectory() as folder:
        chains = write_chains_file(tasks, args.limit, n_layers, Path(folder))
        backends["cola per-document"] = ColaLM(chains=chains, **common)
        times: dict[str, list[float]] = {name: [] for name in backends}
        scores = {}
        for round_ in range(args.repeats):
            names = list(backends)[round_ % 3 :] + list(backends)[: round_ % 3]
            for name in names:
                seconds, scores[name] = timed(backends[name], tasks, args.limit)
                times[name].append(seconds)
                print(f"round {round_ + 1}: {name:18s} {seconds:7.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    identity_ratio = median["cola identity"] / median["hf"]
    per_doc_ratio = median["cola per-document"] / median["cola identity"]
    print(f"\n{args.limit} ARC-Easy documents, batch size {args.batch_size}, {args.dtype}, "
          f"{args.device}, median of {args.repeats} rounds")  # fmt: skip
    for name, seconds in median.items():
        print(f"  {name:18s} {seconds:7.2f} s")
    print(f"  identity / hf            {identity_ratio:.3f}  (target <= 1.05)")
    print(f"  per-document / identity  {per_doc_ratio:.3f}  (target <= 1.50)")
    print(f"  identity results equal hf: {scores['cola identity'] == scores['hf']}")


if __name__ == "__main__":
    main()
