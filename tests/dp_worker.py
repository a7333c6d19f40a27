"""One rank of a CPU data-parallel lm-eval run of ``cola`` (started by torchrun in a test).

HFLM turns data parallelism on only when it sees several GPUs; on CPU this worker wires the
accelerate process group into the backend the same way HFLM does, so the evaluator splits
documents across ranks and ``cola``'s cross-rank chain grouping is exercised for real.
"""

from __future__ import annotations

import json
import sys

import lm_eval
from accelerate import Accelerator
from lm_eval.tasks import TaskManager

from lm_eval_cola.lm import ColaLM


def main(pretrained: str, task_dir: str, chains: str, batch_size: str, out: str) -> None:
    lm = ColaLM(pretrained=pretrained, chains=chains, device="cpu", batch_size=batch_size)
    accelerator = Accelerator(cpu=True)
    lm.accelerator, lm._rank, lm._world_size = (
        accelerator,
        accelerator.process_index,
        accelerator.num_processes,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["cola_mc", "cola_gen", "cola_text"],
        task_manager=TaskManager(include_path=task_dir),
        log_samples=True,
    )
    if lm.rank == 0:
        samples = {
            task: {str(s["doc_id"]): s["resps"] for s in rows}
            for task, rows in results["samples"].items()
        }
        with open(out, "w") as handle:
            json.dump({"world_size": lm.world_size, "samples": samples}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
