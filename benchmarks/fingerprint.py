"""What fingerprinting every byte of the weights costs, per GB, against the sampled scheme.

Loads the model once per dtype, times :func:`model_fingerprint` (XXH3-128 over every byte) and
the earlier ``sampled`` scheme ``--repeats`` times each, and prints the median seconds, the
weights' size and seconds per GB. Target: under 2 s per GB on a 2-core CPU. It exits with status
1 when the fingerprint of the same weights differs between repeats.

Example:

    python benchmarks/fingerprint.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

from lm_eval_cola.default_model import default_model_path
from lm_eval_cola.fingerprint import model_fingerprint, sampled_fingerprint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/fingerprint.py --repeats 5",
    )
    parser.add_argument("--pretrained", default=None, help="model (default: embedded SmolLM2)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def timed(function, model, repeats: int) -> tuple[float, set[str]]:
    seconds, digests = [], set()
    for _ in range(repeats):
        start = time.perf_counter()
        digests.add(function(model))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), digests


def main() -> int:
    args = parse_args()
    path = args.pretrained or default_model_path()
    stable = True
    print(f"{path}, {torch.get_num_threads()} torch threads, median of {args.repeats}")
    for dtype in args.dtypes.split(","):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
        full, digests = timed(model_fingerprint, model, args.repeats)
        sampled, _ = timed(sampled_fingerprint, model, args.repeats)
        stable &= len(digests) == 1
        print(f"  {dtype:9s} {size:.3f} GB: every byte {full:.3f} s ({full / size:.3f} s per GB, "
              f"target < 2), sampled {sampled:.3f} s")  # fmt: skip
    print(f"  {'PASS' if stable else 'FAIL'}: the same weights give the same fingerprint")
    return 0 if stable else 1


if __name__ == "__main__":
    sys.exit(main())
