"""A search's documents split across processes on one machine (``cola search --workers``).

On a CPU a generated-answer search is bound by Python as much as by arithmetic: a decoding
step's layer calls hold a token or four, and a call's bookkeeping (HF's layer code, packing,
the KV cache) runs on one core while the others wait. Processes of one thread each keep every
core busy (docs/BENCHMARKS.md, "Workers"). Each worker is forked from the searching process,
so it shares the loaded weights, and searches every n-th document with ``parallel_docs`` of its
own, as a ``torchrun`` rank does; it sends each finished document back, and only this process
writes to the store. A worker runs one thread: OpenMP's thread pool does not survive a fork (a
forked process that asks for two threads hangs in its first parallel region), so one worker a
core is the way to use them all. A document's chains and answers do not depend on its worker,
its company or the thread count (batch-invariant decoding), so a run searched by workers equals
one searched in one process and resumes in either.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from lm_eval_cola.executor import Work

if TYPE_CHECKING:
    from lm_eval_cola.scoring import Trial
    from lm_eval_cola.search.runner import SearchRun
    from lm_eval_cola.tasks import Document

#: Seconds between two checks that every worker is still alive.
POLL_S = 1.0


def check_workers(workers: int, device: str) -> None:
    """Refuse, before any compute, a worker count the machine cannot run."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: search in at least 1 process")
    if workers > 1 and not str(device).startswith("cpu"):
        raise ValueError(
            f"--workers {workers} on {device}: workers split a CPU's cores; on a GPU search in "
            "one process (or one per GPU with torchrun)"
        )


def search_in_workers(
    run: SearchRun,
    documents: list[Document],
    workers: int,
    scored: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[Document, list[Trial]]]:
    """:meth:`SearchRun.searches` over ``documents`` in ``workers`` forked processes of one
    thread, each on every ``workers``-th document; yields each document as a worker finishes
    it, and adds the workers' compute to the executor's count."""
    context = multiprocessing.get_context("fork")
    messages = context.Queue()
    processes = [
        context.Process(target=_work, args=(run, w, documents[w::workers], messages), daemon=True)
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        yield from _collect(run, documents, processes, messages, scored)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def _collect(run, documents, processes, messages, scored):
    """Hand on what the workers send until each has sent its compute (its last message)."""
    by_hash = {document.doc_hash: document for document in documents}
    finished = 0
    while finished < len(processes):
        try:
            kind, worker, payload = messages.get(timeout=POLL_S)
        except queue.Empty:
            _check_alive(processes)
            continue
        if kind == "scored":
            scored(payload)
        elif kind == "document":
            doc_hash, trials = payload
            yield by_hash[doc_hash], trials
        elif kind == "work":
            run.lm.executor.work += payload
            finished += 1
        else:  # "failed"
            raise RuntimeError(f"search worker {worker} failed:\n{payload}")


def _check_alive(processes) -> None:
    for w, process in enumerate(processes):
        if process.exitcode not in (None, 0):
            raise RuntimeError(
                f"search worker {w} died (exit code {process.exitcode}): out of memory? "
                "Documents it finished are stored; run the same command again to resume"
            )


def _work(run: SearchRun, worker: int, documents: list[Document], messages) -> None:
    """Worker ``worker``: search its documents, send each one's trials as it finishes, then
    the compute it spent."""
    torch.set_num_threads(1)
    try:
        run.lm.executor.work = Work()  # this worker's count, added to the parent's at the end
        found = run.searches(documents, lambda n: messages.put(("scored", worker, n)))
        for document, trials in found:
            messages.put(("document", worker, (document.doc_hash, trials)))
        messages.put(("work", worker, run.lm.executor.work))
    except BaseException:  # the parent reports it (a KeyboardInterrupt too)
        messages.put(("failed", worker, traceback.format_exc()))
    finally:
        messages.close()
        messages.join_thread()
