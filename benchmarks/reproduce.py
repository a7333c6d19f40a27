"""The CoLa paper's findings on one model: Table 1, the headline shares, search methods
against each other per budget, predicted chains, the generation path on GSM8K, and the paper's
own protocol (generated answers on both ARC sets and math, at its sample count), each oracle
with the controls that say what a lottery gives beside it (``--controls``).

Every search is a run in one store, named by its settings, so the same command continues
after a crash (or on more documents) and re-uses every run already finished; the report and
the figures are then rebuilt from the store. Defaults follow the paper: MCTS with 200
simulations and lambda = 5, on ARC-Easy's test split with SmolLM2-135M-Instruct.

Every oracle here is a search rewarded by the gold answer. Beside each headline one (Table 1's
skip + repeat run, GSM8K's, and the combined-space runs of the paper's protocol) the same
search rewarded by a decoy answer, random chains of the same space and budget and, where
``--menu_runs`` names a search of the task's train split, a fixed menu of the chains right on
the most training documents are run on the same documents, and the report ends with ``cola
report``'s tables of every oracle in the store beside its controls (``-`` where one was not
run): with them the full model's own samples on the documents of every generated-answer
headline (kept beside the store, in ``results/paper-sampling/`` for ``results/paper.db``), and
the rescues of the headline and the paper protocol's single-space runs under single-edit
reversion and option shuffle.

Example (after ``cola data import`` of arc_easy and gsm8k from ../shared/data):

    python benchmarks/reproduce.py --limit 100 --store results/reproduce.db \\
        --report results/REPRODUCE.md --figures docs/figures

The paper's protocol alone (``generated``: arc_easy_gen and arc_challenge_gen at 500 documents
in the combined space and 200 in each single space, gsm8k_direct at 200 documents and budget
50), grown round-robin 25 documents at a time so that every table has data when it stops, and
stopping after 2 hours (run it again to go on). results/paper-invariant.db grows it in the
batch-invariant mode, the default; results/paper.db's runs were searched with HF's
``generate`` and grow only with ``--decoding hf``:

    python benchmarks/reproduce.py --sections generated --hours 2 \\
        --store results/paper-invariant.db --report results/PAPER-invariant.md \\
        --figures docs/figures/paper-invariant
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna
from sqlalchemy import select

from lm_eval_cola.lm import load
from lm_eval_cola.predict import predictors as predicting
from lm_eval_cola.predict.dataset import build_training_set
from lm_eval_cola.predict.evaluate import evaluate
from lm_eval_cola.search import controls
from lm_eval_cola.search.runner import DECODINGS, SearchRun, SearchSettings
from lm_eval_cola.store import plots, queries
from lm_eval_cola.store.controls import Samples, read_samples
from lm_eval_cola.store.report import markdown, oracle_rows
from lm_eval_cola.store.schema import Run
from lm_eval_cola.store.store import Store
from lm_eval_cola.targets import TargetError
from lm_eval_cola.tasks import TaskSpec

SECTIONS = ("table1", "methods", "predictors", "gsm8k", "generated")
SPACE_NAMES = {"skip": "skip-only", "repeat": "repeat-only", "both": "skip + repeat (CoLa)"}
CONTROLS = ("decoy", "random", "menu", "sampling", "reversion", "shuffle")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/reproduce.py --limit 100 --store results/reproduce.db",
    )
    add = parser.add_argument
    add("--model_args", default="", help="cola model args (default: SmolLM2-135M-Instruct)")
    add("--device", help="default: cuda when there is one, else cpu")
    add("--store", default="results/reproduce.db")
    add("--report", default="results/REPRODUCE.md", help="markdown report written here")
    add("--figures", default="results/figures", help="PNG figures written here")
    add("--task", default="arc_easy")
    add("--include_path", help="extra folder of task YAMLs (for --task)")
    add("--limit", type=int, default=100, help="test documents searched")
    add("--budget", type=int, default=200, help="MCTS simulations per document (Table 1)")
    add("--spaces", default="both,skip,repeat")
    add("--methods", default="mcts,tpe,random,cmaes,nsga2,gp,qmc")
    add("--method_limit", type=int, help="documents for the method comparison (--limit)")
    add("--method_budget", type=int, help="evaluations per document there (--budget)")
    add(
        "--method_budgets",
        type=_budgets,
        default={},
        help="smaller budgets for slow methods, e.g. gp=50",
    )
    add("--budgets", default="25,50,100,200", help="budgets the comparison reports")
    add("--train_limit", type=int, default=200, help="train-split documents (0: no predictors)")
    add("--train_budget", type=int, default=50)
    add("--gsm8k_limit", type=int, default=30, help="0: skip GSM8K")
    add("--gsm8k_budget", type=int, default=20)
    add("--gsm8k_max_gen_toks", type=int, default=64)
    add("--gsm8k_fewshot", type=int, help="default: the task's own (5)")
    add("--gsm8k_filter", default="flexible-extract", help="answer filter: the last number")
    add("--gen_tasks", default="arc_easy_gen,arc_challenge_gen", help="generated-answer sets")
    add("--gen_limit", type=int, default=500, help="their documents, combined space")
    add("--gen_space_limit", type=int, default=200, help="their documents, skip-/repeat-only")
    add("--math_task", default="gsm8k_direct")
    add("--math_limit", type=int, default=200, help="0: no math")
    add("--math_budget", type=int, default=50)
    add("--step", type=int, default=25, help="documents added to every run per round")
    add(
        "--hours",
        type=float,
        help="start no run's step (its search and controls) after this many hours; the one "
        "under way finishes (default: no limit)",
    )
    add("--parallel_docs", type=int, default=16, help="documents searched per forward pass")
    add("--prefix_cache_mb", type=float, default=1024)
    add("--workers", type=int, default=1, help="CPU processes per search (cola search --workers)")
    add("--decoding", choices=DECODINGS, default="batch_invariant",
        help="how generation tasks decode (cola search --decoding); a store's runs grow only in "
        "their own mode: hf for those searched before batch-invariant decoding")  # fmt: skip
    add("--sections", default=",".join(SECTIONS),
        help="the parts to run and report, of " + "/".join(SECTIONS))  # fmt: skip
    add("--controls", default=",".join(CONTROLS),
        help="beside each headline oracle, of " + "/".join(CONTROLS) + " ('': none)")  # fmt: skip
    add("--menu_runs", type=_menu_runs, default={},
        help="the menu control's training runs, TASK=RUN,... (a search of TASK's train split "
        "with the same model; tasks not named get no menu), e.g. "
        "arc_easy_gen=gen-arc-easy-train")  # fmt: skip
    add("--menu_store", help="the store of --menu_runs (default: --store)")
    return parser.parse_args()


class Reproduction:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        Path(args.store).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(args.store)
        self.lm = load(args.model_args, args.device)
        self.report: list[str] = []
        #: the gold runs whose controls are searched, in the order of the report
        self.headlines: list[int] = []
        #: the paper protocol's single-space gold runs: their rescues are checked too
        self.single_space: list[int] = []

    @property
    def checked(self) -> list[int]:
        """The gold runs whose rescues are checked (the headlines' documents are also sampled,
        :meth:`controlled`)."""
        return self.headlines + self.single_space

    def search(self, task_name: str, method: str, budget: int, limit: int, **options) -> int:
        """The run for these settings, searched (or continued) until all its documents are done."""
        return self.search_run(task_name, method, budget, limit, **options).run()

    def stored(self, task_name: str, method: str, budget: int, **options) -> int | None:
        """The id of the run for these settings already in the store, searching nothing."""
        run = self.search_run(task_name, method, budget, 1, **options)
        with self.store.session() as session:
            return session.scalar(select(Run.id).where(Run.name == run.run_name))

    def search_run(
        self, task_name: str, method: str, budget: int, limit: int, **options
    ) -> SearchRun:
        space, parallel_docs = options.pop("space", "both"), options.pop("parallel_docs", 1)
        target = options.pop("target", "gold")
        spec = TaskSpec(task_name, **options)
        settings = SearchSettings(
            method=method, budget=budget, space={"mode": space}, task=spec, limit=limit,
            target=target, decoding=self.args.decoding,
        )  # fmt: skip
        task = spec.load(self.args.include_path)
        run = SearchRun(
            self.lm, task, self.store, settings, self.args.prefix_cache_mb,
            parallel_docs=parallel_docs, workers=self.args.workers,
        )  # fmt: skip
        self._refuse_the_other_decoding(run)
        return run

    def _refuse_the_other_decoding(self, run: SearchRun) -> None:
        """This script resumes: where the store holds a run of these settings in the other
        decoding mode and none in this one, ``--decoding`` is wrong, and a new run from its
        first document would throw hours away."""
        generates = run.task.get_config("output_type") == "generate_until"
        if not generates or self.store.run_settings(run.run_name) is not None:
            return
        (other,) = set(DECODINGS) - {self.args.decoding}
        settings = dataclasses.replace(run.settings, decoding=other)
        twin = SearchRun(self.lm, run.task, self.store, settings).run_name
        if self.store.run_settings(twin) is not None:
            raise SystemExit(
                f"{self.store} holds run '{twin}' of these settings searched with --decoding "
                f"{other}: pass --decoding {other} to grow it"
            )

    def controlled(self, run_id: int, task_name: str, budget: int, limit: int, **options) -> None:
        """The lottery beside gold run ``run_id`` (searched with these arguments) on its
        documents: the same search rewarded by the decoy, random chains of its space with its
        own chain lengths at its budget (``cola controls random``), the chains right on the most
        training documents (``cola controls menu``, where ``--menu_runs`` names a training run
        of the task) and, on a generated answer judged right or wrong, the full model's own
        samples."""
        wanted = _list(self.args.controls)
        if "sampling" in wanted:
            self.sample(run_id, limit)
        if "decoy" in wanted:
            try:
                self.search(task_name, "mcts", budget, limit, target="decoy", **options)
            except TargetError as err:  # e.g. a chain-of-thought answer: no designated wrong one
                logging.warning("no decoy search for run %d: %s", run_id, err)
        unguided = {"random": ("random-walk", controls.random_options)}
        train_run = self.args.menu_runs.get(task_name)
        if train_run is not None:
            train_store = self.args.menu_store or self.args.store
            unguided["menu"] = ("menu", controls.menu_options(train_store, train_run, budget - 1))
        for method, options_for in (unguided[kind] for kind in wanted if kind in unguided):
            _, task, settings = controls.plan_control(
                self.store, str(run_id), method, options_for, budget - 1, limit,
                self.args.include_path,
            )  # fmt: skip
            SearchRun(
                self.lm, task, self.store, settings, self.args.prefix_cache_mb,
                parallel_docs=options.get("parallel_docs", 1), workers=self.args.workers,
            ).run()  # fmt: skip

    def seconds(self, run_id: int) -> float:
        with self.store.session() as session:
            return queries.run_seconds(session, run_id)

    def stats(self, run_id: int) -> queries.RunStats:
        with self.store.session() as session:
            return queries.stats(session, run_id)

    # -- the sections of the report ----------------------------------------------------------

    def table_1(self) -> None:
        a = self.args
        runs = {s: self.search(a.task, "mcts", a.budget, a.limit, space=s) for s in _list(a.spaces)}
        first = self.stats(next(iter(runs.values())))
        self.add(
            f"## Table 1: {a.task}, {first.documents} test documents, MCTS with {a.budget} "
            "simulations",
            "",
            "| search space | accuracy | run | wall time |",
            "|---|---|---|---|",
            f"| original (full model) | {_pct(first.original_accuracy)} | | |",
        )
        for space, run_id in runs.items():
            stats = self.stats(run_id)
            self.add(
                f"| {SPACE_NAMES[space]} | {_pct(stats.oracle_accuracy)} | {run_id} | "
                f"{_duration(self.seconds(run_id))} |"
            )
        if "both" in runs:
            self.controlled(runs["both"], a.task, a.budget, a.limit, space="both")
            self.headlines.append(runs["both"])
            stats = self.stats(runs["both"])
            self.add(
                "",
                "Headline shares (skip + repeat space):",
                f"- originally correct documents with a shorter correct chain: "
                f"{_pct(stats.shorter_correct_share)} (paper: over 75%)",
                f"- originally wrong documents that some chain corrects: "
                f"{_pct(stats.corrected_share)} (paper: over 60%)",
                f"- mean length of the best chains: {stats.mean_chosen_length:.2f} of "
                f"{stats.n_layers} layers",
                '- what a lottery gives beside them: the section "Controls" below',
                "",
            )
            self.figures([runs["both"]], ("layers", "lengths", "pareto"))

    def methods(self) -> None:
        """Every method on the same documents. A cell reads the first b evaluations of each
        document from one run per method (none plans with its total budget, so Table 1's MCTS
        run serves when its settings match), over the documents every method in that column
        finished: runs may have got to different counts, and a slow method (GP) may have a
        smaller budget (``--method_budgets gp=50``) and then sits out the larger columns."""
        a = self.args
        limit, budget = a.method_limit or a.limit, a.method_budget or a.budget
        runs = {
            m: self.search(a.task, m, a.method_budgets.get(m, budget), limit)
            for m in _list(a.methods)
        }
        budgets = [b for b in map(int, _list(a.budgets)) if b <= budget]
        with self.store.session() as session:
            run_budget = {m: session.get(Run, run_id).budget for m, run_id in runs.items()}
            columns = {
                b: queries.common_documents(
                    session, [run_id for m, run_id in runs.items() if run_budget[m] >= b]
                )
                for b in budgets
            }
            self.add(
                f"## Search methods at equal budgets: {a.task} test documents",
                "",
                "Share of documents with a correct chain / mean length of the best correct "
                "chain, within the first b chain evaluations of each document, on the documents "
                "every method of the column finished.",
                "",
                "| method | " + " | ".join(f"b = {b}" for b in budgets) + " | run (its budget) "
                "| wall time per document |",
                "|---" * (len(budgets) + 3) + "|",
                "| documents | " + " | ".join(str(len(columns[b])) for b in budgets) + " | | |",
            )
            for method, run_id in runs.items():
                cells = [
                    _existence(queries.best_within_budget(session, run_id, b, columns[b]))
                    if run_budget[method] >= b else "-"
                    for b in budgets
                ]  # fmt: skip
                finished = len(queries.common_documents(session, [run_id]))
                per_document = queries.run_seconds(session, run_id) / max(finished, 1)
                self.add(
                    f"| {method} | " + " | ".join(cells) + f" | {run_id} ({run_budget[method]}) | "
                    f"{_duration(per_document)} |"
                )
        self.add("")
        full = [run_id for m, run_id in runs.items() if run_budget[m] >= budget]
        self.figures(full, ("budget",))
        if len(full) < len(runs):
            self.figures(list(runs.values()), ("budget",))

    def predictors(self) -> None:
        a = self.args
        train_run = self.search(a.task, "mcts", a.train_budget, a.train_limit, split="train")
        data = build_training_set(self.lm, self.store, [train_run])
        trained = []
        for kind in predicting.PREDICTORS:
            try:
                trained.append(predicting.train(kind, data, self.lm.identity))
            except ValueError as err:  # e.g. no correct program to train PoLar's head on
                self.add(f"The {kind} predictor was not trained: {err}.", "")
        task = TaskSpec(a.task).load(a.include_path)
        start = time.perf_counter()
        results = evaluate(self.lm, task, trained, a.limit)
        seconds = time.perf_counter() - start
        first = results[0]
        self.add(
            f"## Predicted chains: trained on {len(data.doc_hashes)} {a.task} train documents "
            f"(MCTS, budget {a.train_budget}, run {train_run}), judged on {first.documents} "
            "test documents",
            "",
            f"{len(data.candidates)} candidate chains; prompt states after layer "
            f"{data.spec.layer} of {first.n_layers}, mean-pooled (knn) or per token (network). "
            f"Identity chain: {_pct(first.identity_accuracy)}; best static chain "
            f"`{first.static_chain}`: {_pct(first.static_accuracy)}. Evaluation took "
            f"{_duration(seconds)}.",
            "",
            "| predictor | accuracy | vs identity, points [paired 95% CI] | McNemar p "
            "| chain layers | + feature layers | depth | not the identity "
            f"| oracle@{first.k} (not an accuracy) | menu@{first.k} |",
            "|---|---|---|---|---|---|---|---|---|---|",
        )
        for r in results:
            oracle = "-" if r.oracle_at_k is None else _pct(r.oracle_at_k)
            self.add(
                f"| {r.predictor} | {_pct(r.accuracy)} | {100 * r.delta:+.1f} "
                f"[{100 * r.delta_low:+.1f}, {100 * r.delta_high:+.1f}] | {r.mcnemar_p:.3f} | "
                f"{r.mean_chain_length:.2f} | {r.feature_layers} | {_pct(r.depth)} | "
                f"{_pct(r.differs_from_identity)} | {oracle} | {_pct(r.menu_at_k)} |"
            )
        if not any(r.delta_low > 0 for r in results):
            self.add("", "No predictor beats the identity chain on these documents (95% interval).")
        self.add("")

    def gsm8k(self) -> None:
        a = self.args
        options = {
            "max_gen_toks": a.gsm8k_max_gen_toks,
            "num_fewshot": a.gsm8k_fewshot,
            "filter_name": a.gsm8k_filter,
        }
        run_id = self.search("gsm8k", "mcts", a.gsm8k_budget, a.gsm8k_limit, **options)
        self.controlled(run_id, "gsm8k", a.gsm8k_budget, a.gsm8k_limit, **options)
        self.headlines.append(run_id)
        stats = self.stats(run_id)
        self.add(
            f"## GSM8K (generation): MCTS with {a.gsm8k_budget} simulations, "
            f"{stats.documents} test documents, at most {a.gsm8k_max_gen_toks} new tokens",
            "",
            f"- original accuracy (exact match, {a.gsm8k_filter}): "
            f"{_pct(stats.original_accuracy)}; with the best chain found: "
            f"{_pct(stats.oracle_accuracy)}",
            f"- originally correct with a shorter correct chain: "
            f"{_pct(stats.shorter_correct_share)}; originally wrong and corrected: "
            f"{_pct(stats.corrected_share)}",
            f"- run {run_id}, wall time {_duration(self.seconds(run_id))}",
            "",
        )
        self.figures([run_id], ("lengths",))

    def generated(self) -> None:
        """The paper's protocol: generated answers judged against the gold one, MCTS with
        ``--budget`` simulations, every run grown round-robin (``--step`` documents a round)
        until it has its documents or ``--hours`` have passed."""
        a = self.args
        plan = [(t, "both", a.gen_limit, a.budget) for t in _list(a.gen_tasks)]
        plan += [(t, s, a.gen_space_limit, a.budget) for t in _list(a.gen_tasks)
                 for s in ("skip", "repeat")]  # fmt: skip
        plan += [(a.math_task, "both", a.math_limit, a.math_budget)] if a.math_limit else []
        runs = self.grow(plan)
        self.headlines += [run_id for (_, space, *_), run_id in runs.items() if space == "both"]
        self.single_space += [run_id for (_, space, *_), run_id in runs.items() if space != "both"]
        self.add(
            "## The paper's protocol: generated answers, MCTS per document",
            "",
            "Accuracy (%) of the full model (original) and of the best chain MCTS finds "
            "with the gold answer as reward (an oracle, as in the paper), per search space; "
            "n: documents searched. Shares of all documents as in the paper's Figure 4: "
            "original path still optimal (right, no shorter right chain), correct -> correct "
            "(a shorter right chain), wrong -> correct, wrong -> wrong. The combined-space "
            'runs\' controls are in the section "Controls" below.',
            "",
            "| data set | budget | original | skip-only | repeat-only | skip + repeat (CoLa) "
            "| still optimal | C -> C | W -> C | W -> W | s / document | token-layers / limit |",
            "|---" * 12 + "|",
        )
        for task in dict.fromkeys(t for t, *_ in plan):
            spaces = {space: run_id for (t, space, *_), run_id in runs.items() if t == task}
            self.add(self.generated_row(task, spaces))
        self.add("")
        for (task, space, *_), run_id in runs.items():
            if space == "both":
                self.add(f"Layer usage, skip and repeat rates of the best chains: {task}", "")
                self.figures([run_id], ("layers",))

    def controls_table(self) -> None:
        """``cola report``'s tables: every oracle of the store beside its controls, with the
        full model's own sampling and the rescue checks of the runs this report checks."""
        samples, checks = self.samples(), self.rescue_checks()
        with self.store.session() as session:
            rows = oracle_rows(session, samples, checks)
        self.add(
            "## Controls: what a lottery gives beside every oracle",
            "",
            "Each gold search run of the store (an oracle: some chain gives the gold answer), "
            "counted on the documents the full model gets wrong, beside the same search "
            "rewarded by a decoy answer (the next option, or the gold number plus one), "
            "random chains of its space at its budget and the full model's own samples, as "
            "many as the search's chains, at the best of the temperatures "
            f"{controls.TEMPERATURES} for each number. *Corrections above the lottery*: on "
            "the documents where the full model gives neither answer, the gold search's share "
            "minus the decoy's, with a paired 95% interval. `-`: the control was not run "
            "(`--controls`, or `cola search --target decoy` and `cola controls`).",
            "",
            markdown(rows),
            "",
        )
        for run_id in self.headlines:
            self.add(f"Corrections within k chains beside chance: {self.run_name(run_id)}", "")
            self.figures([run_id], ("controls",), samples)

    def sample(self, run_id: int, limit: int) -> None:
        """The full model's own samples on the first ``limit`` documents of gold run
        ``run_id`` (``budget - 1`` per document and temperature, as many as the search's
        chains after the full model), drawn where the file beside the store lacks them."""
        try:
            gold, task, originals, _ = controls.sampling_source(
                self.store, str(run_id), self.args.include_path
            )
        except controls.ControlError as err:  # scored, or a graded metric
            logging.info("no sampling beside run %d: %s", run_id, err)
            return
        controls.require_model(self.lm, gold, self.args.store)
        k, path = gold.budget - 1, self.sampling_path(gold.name)
        path.parent.mkdir(exist_ok=True)
        log = controls.SampleLog.open(path, controls.sampling_header(gold, k))
        documents = controls.gold_documents(task, gold, limit, originals)
        controls.draw_samples(
            self.lm, task, gold, documents, controls.temperatures_of(controls.TEMPERATURES), k, log
        )

    def samples(self) -> list[tuple[dict, list[dict]]]:
        """The headline runs' samples as drawn so far (:meth:`sample`); a report draws none,
        and a row whose documents they do not all cover shows ``-``. One file serves every
        run of its model and task."""
        if "sampling" not in _list(self.args.controls):
            return []
        paths = (self.sampling_path(self.run_name(run_id)) for run_id in self.headlines)
        return [read_samples(path) for path in paths if path.exists()]

    def run_name(self, run_id: int) -> str:
        with self.store.session() as session:
            return session.get(Run, run_id).name

    def sampling_path(self, run_name: str) -> Path:
        return self.beside_store("sampling") / f"{run_name}.jsonl.gz"

    def beside_store(self, kind: str) -> Path:
        """The folder of the store's ``kind`` files: ``results/paper.db`` keeps its runs'
        samples in ``results/paper-sampling/``, its rescue checks' evaluations in
        ``results/paper-checks/``."""
        store = Path(self.args.store)
        return store.with_name(f"{store.stem}-{kind}")

    def rescue_checks(self) -> list[dict]:
        """Single-edit reversion and option shuffle of every checked oracle's rescues (the
        shortest correct chain of each originally wrong document), as ``cola report
        --checks`` reads them; a generated number has no options to move."""
        wanted, found = _list(self.args.controls), []
        batching = (self.args.prefix_cache_mb, self.args.parallel_docs)
        for run_id in self.checked:
            gold, task, rescued = controls.rescues_of(
                self.store, str(run_id), self.args.include_path
            )
            if "reversion" in wanted:
                log = self.trial_log(gold, "reversion")
                kept = controls.reversions(self.lm, task, gold, rescued, *batching, log)
                found.append(controls.check_counts(kept, gold, "reversion"))
            moved = _movable(task, gold, rescued) if "shuffle" in wanted else None
            if moved is not None:
                log = self.trial_log(gold, "shuffle")
                shuffled = controls.shuffles(self.lm, task, gold, moved, *batching, log)
                found.append(controls.check_counts(shuffled, gold, "shuffle"))
        return found

    def trial_log(self, gold: controls.GoldRun, check: str) -> controls.TrialLog:
        """The check's evaluations kept beside the store, so that a report evaluates only the
        rescues that are new."""
        folder = self.beside_store("checks")
        folder.mkdir(exist_ok=True)
        return controls.TrialLog.of(folder / f"{gold.name}-{check}.jsonl.gz", gold, check)

    def grow(self, plan: list[tuple[str, str, int, int]]) -> dict[tuple, int]:
        """Search every (task, space, limit, budget) of ``plan``, ``--step`` more documents
        per round each, the controls of each combined-space run on the same documents, until
        each has its limit or ``--hours`` have passed (``--hours 0``: search nothing, report
        what the store holds)."""
        a = self.args
        deadline = time.monotonic() + a.hours * 3600 if a.hours is not None else float("inf")
        runs: dict[tuple, int] = {}
        reached = 0
        while reached < max(limit for _, _, limit, _ in plan) and time.monotonic() < deadline:
            reached += a.step
            for task, space, limit, budget in plan:
                if time.monotonic() >= deadline:
                    break
                options = {"space": space, "parallel_docs": a.parallel_docs}
                run_id = self.search(task, "mcts", budget, min(reached, limit), **options)
                runs[(task, space, limit, budget)] = run_id
                if space == "both":
                    self.controlled(run_id, task, budget, min(reached, limit), **options)
        for task, space, limit, budget in plan:  # those the deadline cut off, as stored
            if (task, space, limit, budget) not in runs:
                found = self.stored(task, "mcts", budget, space=space)
                if found is not None:
                    runs[(task, space, limit, budget)] = found
        return dict(sorted(runs.items(), key=lambda item: plan.index(item[0])))

    def generated_row(self, task: str, runs: dict[str, int]) -> str:
        """One data set's line of the generated-answer table."""
        stats = {space: self.stats(run_id) for space, run_id in runs.items()}
        first = next(iter(stats.values()))
        both = stats.get("both")
        cells = [task, str(self._budget(first.run_id))]
        cells.append(f"{_pct(first.original_accuracy)} (n={first.documents})")
        for space in ("skip", "repeat", "both"):
            found = stats.get(space)
            cells.append(f"{_pct(found.oracle_accuracy)} (n={found.documents})" if found else "-")
        if both is None or both.original_accuracy is None:
            return "| " + " | ".join(cells + ["-"] * 6) + " |"
        cells += [_pct(share) for share in _outcomes(both)]
        cells.append(f"{self.seconds(both.run_id) / max(both.documents, 1):.1f}")
        limit = both.token_layer_limit
        cells.append(f"{both.token_layer_applications / limit:.3f}" if limit else "-")
        return "| " + " | ".join(cells) + " |"

    def _budget(self, run_id: int) -> int:
        with self.store.session() as session:
            return session.get(Run, run_id).budget

    def figures(
        self, run_ids: Sequence[int], kinds: Sequence[str], samples: Samples = None
    ) -> None:
        for kind in kinds:
            path = plots.save(self.store, kind, run_ids, Path(self.args.figures), samples=samples)
            self.add(f"![{kind}]({os.path.relpath(path, Path(self.args.report).parent)})", "")

    def add(self, *lines: str) -> None:
        self.report.extend(lines)
        Path(self.args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.report).write_text("\n".join(self.report) + "\n")


def _outcomes(stats: queries.RunStats) -> list[float]:
    """The paper's Figure 4 shares of all documents: original path still optimal, correct ->
    correct (shorter), wrong -> correct, wrong -> wrong."""
    right = stats.original_accuracy or 0.0
    shorter, fixed = stats.shorter_correct_share or 0.0, stats.corrected_share or 0.0
    return [right * (1 - shorter), right * shorter, (1 - right) * fixed, (1 - right) * (1 - fixed)]


def _movable(task, gold, rescued: dict[str, str]) -> list[controls.ShuffledRescue] | None:
    """The rescued documents with their options rotated; ``None`` where they have none."""
    try:
        return controls.shuffled_rescues(task, gold, rescued)
    except TargetError:
        return None


def _list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _budgets(text: str) -> dict[str, int]:
    """``gp=50,cmaes=100`` as {method: budget}."""
    try:
        return {m: int(b) for m, b in (item.split("=") for item in _list(text))}
    except ValueError:
        message = f"{text!r}: give METHOD=BUDGET pairs, e.g. gp=50"
        raise argparse.ArgumentTypeError(message) from None


def _menu_runs(text: str) -> dict[str, str]:
    """``arc_easy_gen=gen-arc-easy-train,...`` as {task: training run}."""
    pairs = [item.split("=") for item in _list(text)]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        message = f"{text!r}: give TASK=RUN pairs, e.g. arc_easy_gen=gen-arc-easy-train"
        raise argparse.ArgumentTypeError(message)
    return dict(pairs)


def _require_menu_runs(args: argparse.Namespace) -> None:
    """Refuse a ``--menu_runs`` task no headline searches, or a run the menu store lacks, before
    any model loads, not in the middle of a growth round."""
    if not args.menu_runs:
        return
    headlines = {args.task, "gsm8k", args.math_task, *_list(args.gen_tasks)}
    unknown = sorted(set(args.menu_runs) - headlines)
    if unknown:
        raise SystemExit(
            f"--menu_runs names {', '.join(unknown)}, which no headline searches: name one of "
            f"{', '.join(sorted(headlines))}"
        )
    with Store(args.menu_store or args.store, read_only=True) as store, store.session() as session:
        missing = [run for run in args.menu_runs.values() if queries.find_run(session, run) is None]
    if missing:
        raise SystemExit(
            f"{store} has no run {', '.join(map(repr, missing))} (--menu_runs): name a search of "
            "the task's train split there, or give its store with --menu_store"
        )


def _existence(best: list[tuple[bool, int]]) -> str:
    """``share with a correct chain / mean length of the best correct chain`` for one cell."""
    correct = [length for ok, length in best if ok]
    mean = sum(correct) / len(correct) if correct else float("nan")
    return f"{_pct(len(correct) / len(best) if best else None)} / {mean:.1f}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    _require_menu_runs(args)
    job = Reproduction(args)
    job.add(
        f"# CoLa on {job.lm.identity.name}",
        "",
        f"{job.lm.identity.n_layers} layers, {job.lm.identity.dtype}, on {job.lm.device} "
        f"({platform.machine()}, {os.cpu_count()} CPUs). Store: `{args.store}`.",
        "",
    )
    sections = _list(args.sections)
    if "table1" in sections:
        job.table_1()
    if "methods" in sections and args.methods:
        job.methods()
    if "predictors" in sections and args.train_limit:
        job.predictors()
    if "gsm8k" in sections and args.gsm8k_limit:
        job.gsm8k()
    if "generated" in sections:
        job.generated()
    job.controls_table()
    job.add(f"Total wall time of this invocation: {_duration(time.perf_counter() - start)}.")
    print(Path(args.report).read_text())


if __name__ == "__main__":
    main()
