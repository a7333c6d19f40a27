"""``cola controls``: unguided runs beside a gold search run, on its documents and budget.

``random`` evaluates, per document, the full model and then ``--k`` random chains of the gold
run's space, drawn with the gold run's own distribution of chain lengths; ``menu`` evaluates
the full model and the ``--k`` chains right on the most documents of a search on training
documents, the same for every document (refused when the training run shares a document with
the gold run). Both are search runs of their own (methods ``random-walk`` and ``menu``,
:mod:`lm_eval_cola.search.baselines`), named after their settings and their gold run, so the
same command resumes or grows them; ``cola db controls`` reports them beside the gold search.

``reversion`` checks the gold run's rescues (the shortest correct chain of each originally
wrong document): each edit of a rescue undone on its own (:func:`single_reversions`), how
many of those chains are still right. A rescue that no reversion leaves right is fragile: its
correction hangs on every edit at once, as a lottery win would.

``sampling`` (generation tasks) asks what the unmodified model finds by itself: ``--k``
answers it samples per document at each temperature (:mod:`lm_eval_cola.sampling`), judged as
the gold run judges a chain's answer; sampling@k beside the search's @k says how much of the
oracle the model's own randomness gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm import tqdm

from lm_eval_cola.chain import Chain
from lm_eval_cola.cli import add_command, add_model_args, check_model_args, load_model
from lm_eval_cola.errors import ColaError, report
from lm_eval_cola.store.cli import share_text

if TYPE_CHECKING:
    from typing import Self

    from lm_eval.api.task import Task

    from lm_eval_cola.lm import ChainLM
    from lm_eval_cola.scoring import Objective, Proposal, Trial
    from lm_eval_cola.search.runner import SearchSettings
    from lm_eval_cola.tasks import Document, TaskSpec

logger = logging.getLogger("lm_eval.cola")
#: The temperatures the full model samples at, by default.
TEMPERATURES = "0.3,0.7,1.0"

HELP = (
    "controls beside a gold search: random chains, a fixed menu, the model's own sampling, "
    "single-edit reversion, option shuffle"
)
EPILOG = """examples:
  cola controls random --store cola.db --run arc-mcts --k 200
  cola controls random --store cola.db --run arc-mcts --k 200 --shard 0/2   (1/2 in another
      process: a control splits its documents as cola search does)
  cola controls menu --store cola.db --run arc-mcts --train_run arc-train --k 200
  cola controls reversion --store cola.db --run arc-mcts --trials arc-reversion.jsonl.gz
      (run again after the search grew: only the new rescues are evaluated)
  cola controls shuffle --store cola.db --run arc_easy_gen-mcts-821d6c8746ca
  cola controls sampling --store cola.db --run arc_easy_gen-mcts-821d6c8746ca --k 49 \\
      --temperatures 0.3,0.7,1.0 --output sampling.jsonl
  cola db controls --store cola.db --run arc-mcts
"""


class ControlError(ColaError, ValueError):
    """The control cannot be made for this gold run; the message says why."""


@dataclass(frozen=True)
class GoldRun:
    """What a control copies from its gold run."""

    id: int
    name: str
    task: str
    split: str | None
    config_hash: str
    fingerprint: str
    seed: int
    budget: int
    n_documents: int
    space: dict[str, Any]
    settings: dict[str, Any]

    @property
    def spec(self) -> TaskSpec:
        """Its task, configured as it was searched."""
        from lm_eval_cola.tasks import TaskSpec

        return TaskSpec.stored(self.task, self.split, self.settings)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "controls", HELP, __doc__, EPILOG)
    kinds = parser.add_subparsers(dest="controls_command", metavar="KIND", required=True)
    random = _add_kind(kinds, "random", "k random chains of the space, lengths as the search's")
    random.set_defaults(func=run_random)
    _add_shard(random)
    menu = _add_kind(kinds, "menu", "the k chains right on the most training documents")
    _add_shard(menu)
    menu.add_argument("--train_run", required=True, help="a search on training documents")
    menu.add_argument("--train_store", help="the training run's store (default: --store)")
    menu.set_defaults(func=run_menu)
    reversion = _add_kind(
        kinds, "reversion", "every rescue with each of its edits undone, one at a time"
    )
    _add_check_files(reversion)
    reversion.set_defaults(func=run_reversion)
    shuffle = _add_kind(
        kinds, "shuffle", "every rescue on its question with the options rotated 1 and 2 places"
    )
    _add_check_files(shuffle)
    shuffle.set_defaults(func=run_shuffle)
    sampling = _add_kind(
        kinds,
        "sampling",
        "the full model's own k samples at each temperature (generation)",
        runs_chains=False,
    )
    sampling.add_argument(
        "--temperatures", default=TEMPERATURES, help=f"comma-separated (default: {TEMPERATURES})"
    )
    sampling.add_argument(
        "--output",
        required=True,
        help="JSON lines, one per document and temperature, written as each finishes "
        "(gzip-compressed for a name ending in .gz); the same command resumes from them",
    )
    sampling.set_defaults(func=run_sampling)


def _add_kind(kinds: argparse._SubParsersAction, name: str, summary: str, runs_chains: bool = True):
    """A control's parser; one that runs no chains (the model's own sampling) takes no
    options for batching them."""
    parser = add_command(
        kinds,
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ", on every document of a gold run.",
        epilog=EPILOG,
    )
    parser.add_argument("--store", default="cola.db", help="the gold run's store")
    parser.add_argument("--run", required=True, help="the gold run, id or name")
    unit = "chains per document" if runs_chains else "samples per document and temperature"
    parser.add_argument("--k", type=int, help=f"{unit} (default: the gold budget)")
    parser.add_argument(
        "--limit", type=int, help="the first N documents of the gold run's (default: all)"
    )
    add_model_args(parser, "the gold run's model")
    parser.add_argument("--include_path", help="extra folder of task YAMLs")
    if runs_chains:
        parser.add_argument("--parallel_docs", type=int, default=16, help="(default: 16)")
        parser.add_argument("--prefix_cache_mb", type=float, default=4096, help="(default: 4096)")
    return parser


def _add_check_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", help="also write the counts as JSON here (for cola report --checks)"
    )
    parser.add_argument(
        "--trials",
        help="keep every evaluation here as JSON lines (.gz: compressed) and read back those it "
        "holds, so a check of the run after it grew evaluates only the new rescues",
    )


def _add_shard(parser: argparse.ArgumentParser) -> None:
    """A control that is a run of its own splits its documents as ``cola search`` does; each
    document's seed makes the shards' union equal one whole run."""
    parser.add_argument(
        "--shard", help="i/n: every n-th document from the i-th, e.g. two processes at 0/2 and 1/2"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="CPU processes on this machine (as cola search)"
    )


def run_random(args: argparse.Namespace) -> int:
    return _run_control(args, "random-walk", random_options)


def random_options(store, gold: GoldRun, documents: set[str]) -> dict[str, Any]:
    """Random chains drawn with the gold run's own distribution of chain lengths."""
    from lm_eval_cola.store import controls

    with store.session() as session:
        found = controls.run_lengths(session, gold.id)
    lengths = {str(n): count for n, count in found.items()}  # string keys, as JSON keeps them
    return {"lengths": lengths, "source": gold.name}


def run_menu(args: argparse.Namespace) -> int:
    options_for = menu_options(args.train_store or args.store, args.train_run, args.k)
    return _run_control(args, "menu", options_for)


def menu_options(train_store: str, train_run: str, k: int | None):
    """``options_for`` of a menu control (see :func:`plan_control`): the ``k`` chains (default:
    the gold budget) right on the most documents of ``train_run``, a search of the same
    weights on other documents, so that no gold answer of the gold run's chose them."""
    from lm_eval_cola.store import queries
    from lm_eval_cola.store.store import Store

    def menu(store: Store, gold: GoldRun, documents: set[str]) -> dict[str, Any]:
        with Store(train_store, read_only=True) as train:
            trained = _gold_run(train, train_run)
            if trained.fingerprint != gold.fingerprint:
                raise ControlError(f"training run {trained.id} was searched on other weights")
            with train.session() as session:
                seen = set(queries.finished_documents(session, [trained.id]))
                wanted = k or gold.budget
                chains = queries.frequent_chains(session, [trained.id], wanted + 1)
        shared = seen & documents
        if shared:
            raise ControlError(
                f"training run {trained.id} has {len(shared)} of gold run {gold.id}'s documents: "
                "a menu must be chosen on other documents (search the train split)"
            )
        identity = str(Chain.identity(int(gold.space["n_layers"])))
        chosen = [c for c in chains if c != identity][:wanted]
        if len(chosen) < wanted:
            logger.warning(
                "training run %d (%s) has only %d chains besides the full model right on any of "
                "its documents: the menu holds those, not --k %d; search more training documents "
                "to fill it", trained.id, trained.name, len(chosen), wanted,
            )  # fmt: skip
        return {"chains": chosen, "source": trained.name}

    return menu


def _run_control(args: argparse.Namespace, method: str, options_for) -> int:
    """Build the control run of the gold run ``args.run`` with ``method`` and run it."""
    from lm_eval_cola.lm import default_device
    from lm_eval_cola.search.runner import SearchRun, shard_of
    from lm_eval_cola.search.workers import check_workers
    from lm_eval_cola.store.store import Store

    try:
        shard = shard_of(args.shard)
        check_workers(args.workers, args.device or default_device())
        check_model_args(args)
        with Store(args.store, read_only=True) as store:
            gold, task, settings = plan_control(
                store, args.run, method, options_for, args.k, args.limit, args.include_path
            )
        lm = _model_of(args, gold)
    except (ColaError, ValueError) as err:
        return report(f"cola controls {args.controls_command}", err)
    with Store(args.store) as store:
        search = SearchRun(
            lm, task, store, settings, args.prefix_cache_mb, parallel_docs=args.parallel_docs,
            workers=args.workers,
        )  # fmt: skip
        run_id = search.run(shard)
    print(f"{gold.task}: {method} control run {run_id} of run {gold.id}: {search.tally}")
    print(f"  see: cola db controls --store {args.store} --run {gold.id}")
    return 0


def plan_control(
    store,
    run: str,
    method: str,
    options_for,
    k: int | None,
    limit: int | None,
    include_path: str | None = None,
) -> tuple[GoldRun, Task, SearchSettings]:
    """The gold run ``run``, its task and the settings of its ``method`` control with ``k``
    chains per document (default: the run's budget) on its first ``limit`` documents;
    ``options_for(store, gold, doc_hashes)`` chooses the chains. A control of this kind and
    size made before keeps its options, so that it resumes after its source has grown."""
    from lm_eval_cola.tasks import task_documents

    gold, task = _gold_and_task(store, run, include_path)
    limit = min(limit or gold.n_documents, gold.n_documents)
    documents = {d.doc_hash for d in task_documents(task, limit)}
    k = k or gold.budget
    options = options_for(store, gold, documents)
    options = _existing_options(store, gold, method, k, options["source"]) or options
    return gold, task, control_settings(gold, method, options, k, limit)


def _gold_and_task(store, run: str, include_path: str | None):
    """The gold run ``run`` and its task, refused if the task has changed since."""
    from lm_eval_cola.search.runner import describe_task

    gold = _gold_run(store, run)
    task = gold.spec.load(include_path)
    if describe_task(task).config_hash != gold.config_hash:
        raise ControlError(f"task {gold.task} has changed since run {gold.id}")
    return gold, task


def _model_of(args: argparse.Namespace, gold: GoldRun):
    """The model of ``--model_args``, refused unless it has the gold run's weights."""
    lm = load_model(args)
    require_model(lm, gold, args.store)
    return lm


def require_model(lm: ChainLM, gold: GoldRun, store: str) -> None:
    """Refuse ``lm`` unless it has the gold run's weights: a control of another model's run
    would stand beside that run's oracle as if it were its own."""
    from lm_eval_cola.fingerprint import require_match

    what, option = f"run {gold.id} ({gold.name})", f"--store {store}"
    require_match(what, "its model", gold.fingerprint, lm.identity, option, ControlError)


def run_reversion(args: argparse.Namespace) -> int:
    """Undo each edit of every rescue of the gold run, one at a time, and count the rescues
    that survive (a reverted chain still right)."""
    try:
        gold, task, rescued, log = _rescues_of(args, "reversion")
        lm = _model_of(args, gold)
    except (ColaError, ValueError) as err:
        return report("cola controls reversion", err)
    survival = reversions(lm, task, gold, rescued, args.prefix_cache_mb, args.parallel_docs, log)
    return _reported(survival, gold, args)


def reversions(
    lm: ChainLM, task: Task, gold: GoldRun, rescued: dict[str, str], prefix_cache_mb: float,
    parallel_docs: int, log: TrialLog | None = None,
) -> Survival:  # fmt: skip
    """Every single-edit reversion of each rescue (document hash -> chain), evaluated (those
    in ``log`` read back)."""
    from lm_eval_cola.scoring import Proposal
    from lm_eval_cola.search.space import single_reversions
    from lm_eval_cola.tasks import task_documents

    documents = {d.doc_hash: d for d in task_documents(task, gold.n_documents)}
    proposals = [
        Proposal(documents[doc_hash], reverted)
        for doc_hash, chain in rescued.items()
        if doc_hash in documents
        for reverted in single_reversions(Chain.parse(chain), lm.executor.n_layers)
    ]
    objective = _objective(lm, task, gold, prefix_cache_mb)
    trials = _score(objective, proposals, parallel_docs, "Reverting single edits", log)
    return Survival.of(rescued, proposals, trials)


def _score(
    objective: Objective, proposals: list[Proposal], parallel_docs: int, desc: str,
    log: TrialLog | None,
) -> list[Trial]:  # fmt: skip
    if log is None:
        return objective.score_all(proposals, parallel_docs, desc)
    return log.score(objective, proposals, parallel_docs, desc)


def run_shuffle(args: argparse.Namespace) -> int:
    """Every rescue and the full model on the rescued documents with their options rotated
    one and two places: does the rescue follow the gold answer's text or its old position?"""
    try:
        gold, task, rescued, log = _rescues_of(args, "shuffle")
        moved = shuffled_rescues(task, gold, rescued)
        lm = _model_of(args, gold)
    except (ColaError, ValueError) as err:
        return report("cola controls shuffle", err)
    check = shuffles(lm, task, gold, moved, args.prefix_cache_mb, args.parallel_docs, log)
    return _reported(check, gold, args)


@dataclass(frozen=True)
class ShuffledRescue:
    """A rescue's document with its options rotated, and where its gold answer was."""

    document: Document
    chain: Chain
    #: the gold target before the rotation
    before: str


def shuffled_rescues(task: Task, gold: GoldRun, rescued: dict[str, str]) -> list[ShuffledRescue]:
    """Each rescued document rotated by every shift of :data:`SHIFTS`; refused (before any
    compute) for documents whose options cannot be moved."""
    from lm_eval_cola.targets import shuffled
    from lm_eval_cola.tasks import documents_of, task_documents

    originals = {d.doc_hash: d for d in task_documents(task, gold.n_documents)}
    pairs = [(h, shift) for h in rescued if h in originals for shift in SHIFTS]
    moved = [shuffled(originals[h].doc, shift) for h, shift in pairs]
    documents = documents_of(task, moved) if moved else []
    return [
        ShuffledRescue(document, Chain.parse(rescued[h]), str(task.doc_to_target(originals[h].doc)))
        for document, (h, _) in zip(documents, pairs, strict=True)
    ]


def shuffles(
    lm: ChainLM, task: Task, gold: GoldRun, moved: list[ShuffledRescue], prefix_cache_mb: float,
    parallel_docs: int, log: TrialLog | None = None,
) -> ShuffleCheck:  # fmt: skip
    """Each shuffled rescue and the full model on its document, evaluated (those in ``log``
    read back)."""
    from lm_eval_cola.scoring import Proposal

    identity = Chain.identity(lm.executor.n_layers)
    proposals = [Proposal(m.document, chain) for m in moved for chain in (m.chain, identity)]
    objective = _objective(lm, task, gold, prefix_cache_mb)
    trials = _score(objective, proposals, parallel_docs, "Rescues on shuffled options", log)
    before = [m.before for m in moved]
    return ShuffleCheck.of(len(moved) // len(SHIFTS), trials[0::2], trials[1::2], before)


def run_sampling(args: argparse.Namespace) -> int:
    """The full model's own answers on the gold run's documents, ``--k`` samples per document
    at each temperature, judged by the gold answer; resumed from ``--output``."""
    from lm_eval_cola.store.store import Store

    try:
        check_model_args(args)
        temperatures = temperatures_of(args.temperatures)
        with Store(args.store, read_only=True) as store:
            gold, task, originals, greedy = sampling_source(store, args.run, args.include_path)
        k = args.k or gold.budget
        log = SampleLog.open(Path(args.output), sampling_header(gold, k))
        documents = gold_documents(task, gold, args.limit, originals)
        lm = _model_of(args, gold)
    except (ColaError, ValueError) as err:
        return report("cola controls sampling", err)
    records = draw_samples(lm, task, gold, documents, temperatures, k, log)
    print(SamplingCheck.of(records, originals, k).text(gold.id))
    try:
        lottery = SampledLottery.of(lm, task, gold.spec, documents, originals, greedy, records)
    except ControlError as err:
        return report("cola controls sampling", err)
    if lottery is not None:
        print(lottery.text())
    return 0


def sampling_header(gold: GoldRun, k: int) -> dict[str, Any]:
    """What a sampling file names: the gold run, k, the seed and the model's weights, so that
    ``cola report --sampling`` gives it to that run's rows only."""
    return {"run": gold.name, "k": k, "seed": gold.seed, "fingerprint": gold.fingerprint}


def draw_samples(
    lm: ChainLM, task: Task, gold: GoldRun, documents: list[Document], temperatures: list[float],
    k: int, log: SampleLog,
) -> list[dict[str, Any]]:  # fmt: skip
    """``k`` samples of the full model per document and temperature, those ``log`` lacks drawn
    and appended as each finishes; returns the records of these documents and temperatures."""
    from lm_eval_cola.sampling import seed_for
    from lm_eval_cola.scoring import Objective

    objective = Objective(lm, task, gold.spec)
    wanted = [(d, t) for d in documents for t in temperatures]
    todo = [(d, t) for d, t in wanted if (d.doc_hash, t) not in log.done]
    for document, temperature in tqdm(todo, desc="Sampling", disable=not todo):
        start = time.perf_counter()
        seed = seed_for(gold.seed, document.doc_hash, temperature)
        trials = objective.sampled(document, k, temperature, seed)
        log.write({
            "doc_hash": document.doc_hash,
            "temperature": temperature,
            "correct": [t.correct for t in trials],
            "answers": [t.response for t in trials],
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
    keys = {(d.doc_hash, t) for d, t in wanted}
    return [r for r in log.records if (r["doc_hash"], r["temperature"]) in keys]


def temperatures_of(text: str) -> list[float]:
    """``--temperatures`` as numbers, refused unless there is one and none is negative."""
    temperatures = [float(t) for t in text.split(",") if t.strip()]
    if not temperatures or min(temperatures) < 0:
        raise ControlError(f"--temperatures {text}: give temperatures >= 0")
    return temperatures


def sampling_source(store, run: str, include_path: str | None = None):
    """The gold run, its task and its full model's correctness and answer per document;
    refused unless the task generates one answer judged right or wrong."""
    from lm_eval_cola.scoring import BINARY_PREFIXES
    from lm_eval_cola.store import controls
    from lm_eval_cola.tasks import check_task

    gold, task = _gold_and_task(store, run, include_path)
    with store.session() as session:
        originals = controls.originals(session, gold.id)
        greedy = controls.original_answers(session, gold.id)
    if task.get_config("output_type") != "generate_until":
        raise ControlError(f"run {gold.id} is on {gold.task}, which generates nothing to sample")
    metric, _ = check_task(task, gold.spec.metric, gold.spec.filter_name)
    if not metric.startswith(BINARY_PREFIXES):
        raise ControlError(f"run {gold.id} scores {metric}: sampling needs a right/wrong metric")
    return gold, task, originals, greedy


def gold_documents(task, gold: GoldRun, limit: int | None, finished: dict[str, bool]):
    """The first ``limit`` documents of the gold run's that it has finished."""
    from lm_eval_cola.tasks import task_documents

    limit = min(limit or gold.n_documents, gold.n_documents)
    return [d for d in task_documents(task, limit) if d.doc_hash in finished]


@dataclass
class RecordLog:
    """A control's results as JSON lines: a header naming the settings, then one record per
    line, appended as each is done (gzip-compressed where the file's name ends in ``.gz``), so
    that the same command, run again, goes on from them."""

    path: Path
    records: list[dict[str, Any]]

    #: the command that writes such files, what the records are and the option that names
    #: the file, for the refusals below
    command: ClassVar[str] = "cola controls"
    kind: ClassVar[str] = "records"
    option: ClassVar[str] = "--output"

    @classmethod
    def open(cls, path: Path, header: dict[str, Any]) -> Self:
        from lm_eval_cola.store.controls import append_text, read_records

        if not path.exists() or path.stat().st_size == 0:
            append_text(path, json.dumps(header) + "\n")
            return cls(path, [])
        found, records = read_records(path, f"{cls.command} {cls.option}")
        written_before = {k: v for k, v in header.items() if k != "fingerprint"}
        if found not in (header, written_before):  # files once named no model
            raise ControlError(
                f"{path} holds {cls.kind} of other settings ({found}); give another {cls.option}"
            )
        return cls(path, records)

    def write(self, *records: dict[str, Any]) -> None:
        """Append ``records`` in one write (one gzip member)."""
        from lm_eval_cola.store.controls import append_text

        if records:
            append_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
            self.records.extend(records)


class SampleLog(RecordLog):
    """``cola controls sampling``'s results: one record per (document, temperature)."""

    command, kind = "cola controls sampling", "samples"

    @property
    def done(self) -> set[tuple[str, float]]:
        return {(r["doc_hash"], r["temperature"]) for r in self.records}


class TrialLog(RecordLog):
    """A rescue check's evaluations (``--trials``): one record per (document, chain), so that
    checking a run again after it grew evaluates only its new rescues."""

    command, kind, option = "cola controls reversion|shuffle", "evaluations", "--trials"

    @classmethod
    def of(cls, path: str | Path | None, gold: GoldRun, check: str) -> TrialLog | None:
        """The log at ``path`` for ``check`` of ``gold`` (``None``: evaluations not kept)."""
        if path is None:
            return None
        header = {"run": gold.name, "fingerprint": gold.fingerprint, "check": check}
        return cls.open(Path(path), header)

    def score(
        self, objective: Objective, proposals: list[Proposal], parallel_docs: int, desc: str
    ) -> list[Trial]:
        """Every proposal's trial: those in the log read back, the others scored and logged
        pass by pass (a check that dies keeps the passes it finished)."""
        kept = {(r["doc_hash"], r["chain"]): r for r in self.records}
        keys = [(p.document.doc_hash, str(p.chain)) for p in proposals]
        missing = [p for p, key in zip(proposals, keys, strict=True) if key not in kept]

        def log(done: list[Proposal], scored: list[Trial]) -> None:
            new = [
                {"doc_hash": p.document.doc_hash, "chain": str(p.chain), "score": t.score,
                 "correct": t.correct, "response": t.response}
                for p, t in zip(done, scored, strict=True)
            ]  # fmt: skip
            self.write(*new)
            kept.update(((r["doc_hash"], r["chain"]), r) for r in new)

        objective.score_all(missing, parallel_docs, desc, on_pass=log)
        return [_logged_trial(p.chain, kept[key]) for p, key in zip(proposals, keys, strict=True)]


def _logged_trial(chain: Chain, record: dict[str, Any]) -> Trial:
    """A logged evaluation as the trial a check counts (its correctness and its answer)."""
    from lm_eval_cola.scoring import Trial

    return Trial(chain, record["score"], record["correct"], {}, response=record["response"])


@dataclass(frozen=True)
class SamplingCheck:
    """sampling@k: of the documents whose full model (greedy) is wrong, those where one of
    the first k samples is right, per temperature and at the best temperature for each k."""

    documents: int
    wrong: int
    samples: int
    #: temperature -> k -> documents corrected
    corrected: dict[float, dict[int, int]]
    #: temperature -> share of all its samples that are right
    right: dict[float, float]
    seconds: float

    @classmethod
    def of(cls, records: list[dict], originals: dict[str, bool], k: int) -> SamplingCheck:
        from lm_eval_cola.store.controls import sampled_corrections

        right: dict[float, float] = {}
        for temperature in sorted({r["temperature"] for r in records}):
            mine = [r for r in records if r["temperature"] == temperature]
            right[temperature] = sum(map(sum, (r["correct"] for r in mine))) / (len(mine) * k)
        return cls(
            documents=len({r["doc_hash"] for r in records}),
            wrong=len({r["doc_hash"] for r in records if not originals[r["doc_hash"]]}),
            samples=k,
            corrected=sampled_corrections(records, originals, sorted({1, 5, k} & {*range(k + 1)})),
            right=right,
            seconds=sum(r["seconds"] for r in records) / max(len(records), 1),
        )

    def best(self, n: int) -> int:
        return max((counts[n] for counts in self.corrected.values()), default=0)

    def text(self, run_id: int) -> str:
        budgets = sorted(next(iter(self.corrected.values()), {}))
        lines = [
            f"run {run_id}: the full model's own samples on {self.documents} documents, "
            f"{self.samples} per temperature; its greedy answer wrong on {self.wrong}",
        ]
        for temperature, counts in self.corrected.items():
            within = ", ".join(f"@{n} {share_text(counts[n], self.wrong)}" for n in budgets)
            lines.append(
                f"  temperature {temperature:g}: wrong -> right {within}; "
                f"samples right {100 * self.right[temperature]:.1f}%"
            )
        best = ", ".join(f"@{n} {share_text(self.best(n), self.wrong)}" for n in budgets)
        lines.append(f"  best temperature per k: {best}")
        lines.append(f"  cost: {self.seconds:.2f} s per document and temperature")
        return "\n".join(lines)


@dataclass(frozen=True)
class SampledLottery:
    """sampling@k is an oracle too (any of k samples right, judged by the gold answer): the
    same samples judged by the decoy say how much of it any designated answer would get. On
    the documents whose full model (greedy) gives neither answer, per temperature: those where
    one of the k samples gives the gold answer, those where one gives the decoy."""

    samples: int
    #: temperature -> (documents, gold reached, decoy reached)
    reached: dict[float, tuple[int, int, int]]
    #: temperature -> paired 95% interval of gold minus decoy
    intervals: dict[float, tuple[float, float]]

    @classmethod
    def of(
        cls,
        lm: ChainLM,
        task: Task,
        spec: TaskSpec,
        documents: list[Document],
        originals: dict[str, bool],
        greedy: dict[str, str | None],
        records: list[dict[str, Any]],
    ) -> SampledLottery | None:
        """Every stored answer judged again by the task, against both targets (the greedy
        answer against the decoy only: ``originals`` has its gold verdict); ``None`` for a
        task with no decoy. Refused when an answer no longer judges as it was stored (an
        answer cut to the stored length, another task version)."""
        from lm_eval_cola.scoring import Objective
        from lm_eval_cola.statistics import paired_interval
        from lm_eval_cola.targets import TARGETS, TargetError, check_decoys

        try:
            check_decoys(task, documents)
        except TargetError:
            return None
        judges = {target: Objective(lm, task, spec, target=target) for target in TARGETS}
        by_hash = {d.doc_hash: d for d in documents if greedy.get(d.doc_hash) is not None}

        def hits(target: str, doc_hash: str, answers: list[str]) -> list[bool]:
            return [t.correct for t in judges[target].judge_outputs(by_hash[doc_hash], answers)]

        neither = {h for h in by_hash if not originals[h] and not hits("decoy", h, [greedy[h]])[0]}
        reached, intervals = {}, {}
        for temperature in sorted({r["temperature"] for r in records}):
            pairs = []
            for record in records:
                if record["temperature"] != temperature or record["doc_hash"] not in neither:
                    continue
                gold_hits = hits("gold", record["doc_hash"], record["answers"])
                if gold_hits != record["correct"]:
                    raise ControlError(
                        f"the stored answers of document {record['doc_hash'][:12]} at "
                        f"temperature {temperature:g} no longer judge as they did: sample again "
                        "into another --output"
                    )
                pairs.append(
                    (any(gold_hits), any(hits("decoy", record["doc_hash"], record["answers"])))
                )
            gold_side, decoy_side = [g for g, _ in pairs], [d for _, d in pairs]
            reached[temperature] = (len(pairs), sum(gold_side), sum(decoy_side))
            if pairs:
                intervals[temperature] = paired_interval(gold_side, decoy_side)
        return cls(len(records[0]["answers"]) if records else 0, reached, intervals)

    def text(self) -> str:
        lines = [
            f"the same {self.samples} samples judged by the decoy too, on the documents whose full "
            "model gives neither answer:"
        ]
        for temperature, (n, gold, decoy) in self.reached.items():
            above = ""
            if n:
                low, high = self.intervals[temperature]
                above = (
                    f"; above the lottery {100 * (gold - decoy) / n:+.1f} points "
                    f"[{100 * low:+.1f}, {100 * high:+.1f}]"
                )
            lines.append(
                f"  temperature {temperature:g}: gold reached {share_text(gold, n)}, "
                f"decoy reached {share_text(decoy, n)}{above}"
            )
        return "\n".join(lines)


#: How far the options move: every option to another place, for three options or more.
SHIFTS = (1, 2)


def _rescues_of(args: argparse.Namespace, check: str):
    """The gold run, its task, its rescues and the log of the check's evaluations
    (``--trials``): everything a check can refuse before its caller loads the model."""
    from lm_eval_cola.store.store import Store

    check_model_args(args)
    with Store(args.store, read_only=True) as store:
        gold, task, rescued = rescues_of(store, args.run, args.include_path)
    return gold, task, rescued, TrialLog.of(args.trials, gold, check)


def rescues_of(
    store, run: str, include_path: str | None = None
) -> tuple[GoldRun, Task, dict[str, str]]:
    """The gold run ``run``, its task and its rescues (document hash -> the shortest correct
    chain of each originally wrong document)."""
    from lm_eval_cola.store import controls

    gold, task = _gold_and_task(store, run, include_path)
    with store.session() as session:
        return gold, task, controls.rescues(session, gold.id)


def _objective(lm: ChainLM, task, gold: GoldRun, prefix_cache_mb: float):
    """The gold run's objective: its task, metric and filter, rewarded by the gold answer."""
    from lm_eval_cola.scoring import Objective
    from lm_eval_cola.store.schema import decoded_batch_invariantly

    invariant = decoded_batch_invariantly(gold.settings)
    return Objective(lm, task, gold.spec, prefix_cache_mb, batch_invariant=invariant)


def _reported(result, gold: GoldRun, args: argparse.Namespace) -> int:
    """Print the check; ``--output`` also keeps its counts (:func:`check_counts`)."""
    print(result.text(gold.id))
    if args.output:
        counts = check_counts(result, gold, args.controls_command)
        Path(args.output).write_text(json.dumps(counts, indent=2) + "\n")
    return 0


def check_counts(result: ShuffleCheck | Survival, gold: GoldRun, check: str) -> dict[str, Any]:
    """A rescue check's counts with the run and check they belong to, as ``cola report
    --checks`` reads them."""
    return {
        "run": gold.name,
        "fingerprint": gold.fingerprint,
        "check": check,
        **dataclasses.asdict(result),
    }


@dataclass(frozen=True)
class ShuffleCheck:
    """Rescues on their documents with the options moved (each rotation counted apart)."""

    rescues: int
    shuffles: int
    #: the rescue still right: it follows the gold answer's text
    content: int
    #: the rescue answers where the gold answer used to be: it follows the position
    position: int
    #: the full model right on the shuffled document (it was wrong before)
    full_model_right: int

    @classmethod
    def of(cls, rescues: int, rescue_trials: list, full_trials: list, before: list[str]):
        return cls(
            rescues=rescues,
            shuffles=len(rescue_trials),
            content=sum(t.correct for t in rescue_trials),
            position=sum(
                (t.response or "").strip() == old
                for t, old in zip(rescue_trials, before, strict=True)
            ),
            full_model_right=sum(t.correct for t in full_trials),
        )

    def text(self, run_id: int) -> str:
        return "\n".join([
            f"run {run_id}: {self.rescues} rescues, each with its options rotated "
            f"{' and '.join(map(str, SHIFTS))} places ({self.shuffles} shuffled documents)",
            f"  the rescue follows the answer's text (still right): "
            f"{share_text(self.content, self.shuffles)}",
            f"  the rescue follows the old position: {share_text(self.position, self.shuffles)}",
            f"  the full model right on the shuffled document: "
            f"{share_text(self.full_model_right, self.shuffles)}",
        ])  # fmt: skip


@dataclass(frozen=True)
class Survival:
    """Rescues under single-edit reversion."""

    rescues: int
    #: rescues with at least one edit to undo (a rescue may be the full model's own order
    #: with nothing undone, which cannot happen for a wrong full model)
    checked: int
    reversions: int
    still_right: int
    #: rescues every one of whose reversions is still right, and none of whose is
    robust: int
    fragile: int

    @classmethod
    def of(cls, rescued: dict[str, str], proposals: list, trials: list) -> Survival:
        per_rescue: dict[str, list[bool]] = {}
        for proposal, trial in zip(proposals, trials, strict=True):
            per_rescue.setdefault(proposal.document.doc_hash, []).append(trial.correct)
        outcomes = list(per_rescue.values())
        return cls(
            rescues=len(rescued),
            checked=len(outcomes),
            reversions=sum(map(len, outcomes)),
            still_right=sum(map(sum, outcomes)),
            robust=sum(all(o) for o in outcomes),
            fragile=sum(not any(o) for o in outcomes),
        )

    def text(self, run_id: int) -> str:
        return "\n".join([
            f"run {run_id}: {self.rescues} rescues (the shortest correct chain of each "
            "originally wrong document)",
            f"  single-edit reversions evaluated: {self.reversions} (of {self.checked} rescues)",
            f"  reversions still right: {share_text(self.still_right, self.reversions)}",
            f"  rescues that survive every reversion: {share_text(self.robust, self.checked)}",
            f"  rescues that no reversion leaves right: {share_text(self.fragile, self.checked)}",
        ])  # fmt: skip


def control_settings(gold: GoldRun, method: str, options: dict, k: int, limit: int):
    """The gold run's settings with ``method`` choosing the chains: the full model and ``k``
    chains per document, on the first ``limit`` documents, decoded as the gold run decoded."""
    from lm_eval_cola.search.runner import SearchSettings

    space = {key: value for key, value in gold.space.items() if key != "n_layers"}
    return SearchSettings(
        method=method,
        budget=k + 1,
        seed=gold.seed,
        space=space,
        method_options=options,
        task=gold.spec,
        limit=limit,
        control_of=gold.name,
        decoding=gold.settings.get("decoding") or "hf",
    )


def _gold_run(store, spec: str) -> GoldRun:
    from lm_eval_cola.store import queries
    from lm_eval_cola.store.schema import Run

    with store.session() as session:
        run_id = queries.find_run(session, spec)
        if run_id is None:
            raise ControlError(f"{store} has no run '{spec}'")
        run = session.get(Run, run_id)
        if run.settings.get("target", "gold") != "gold" or run.settings.get("control_of"):
            raise ControlError(f"run {run_id} is itself a control: name the gold search run")
        return GoldRun(
            run.id, run.name, run.task.name, run.task.split, run.task.config_hash,
            run.model.fingerprint, run.seed, run.budget, run.n_documents, run.space,
            run.settings,
        )  # fmt: skip


def _existing_options(
    store, gold: GoldRun, method: str, k: int, source: str
) -> dict[str, Any] | None:
    """The options of an earlier control of this kind, size and source, so that the same
    command resumes it even after its source has grown (and its lengths or menu moved)."""
    from lm_eval_cola.store import controls
    from lm_eval_cola.store.schema import Run

    with store.session() as session:
        runs = controls.controls_of(session, session.get(Run, gold.id))
        found = [
            run.settings["method_options"]
            for run in runs
            if run.method == method
            and run.budget == k + 1
            and run.settings["method_options"].get("source") == source
        ]
        return found[-1] if found else None
