"""The weights fingerprint covers every byte: one changed value is another model, the same
weights are the same model however they are loaded, and stores, predictor files and request
caches written under the earlier sampled fingerprint are recognised and re-registered."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import SafetensorError
from sqlalchemy import select

from lm_eval_cola.cli import main
from lm_eval_cola.fingerprint import (
    FingerprintError,
    is_sampled,
    model_fingerprint,
    sampled_fingerprint,
)
from lm_eval_cola.lm import ColaLM
from lm_eval_cola.sources import ChainSourceError
from lm_eval_cola.store.schema import Model, Run
from lm_eval_cola.store.store import Store, default_run_name
from tests.conftest import save_tiny

pytestmark = pytest.mark.internals  # run on every transformers line (tox.ini)

#: Wide enough that the sampled scheme's stride (one value in 32) skips flat index 1.
WIDE = {"hidden_size": 256, "intermediate_size": 512}


def edited_copy(source: str, target: Path) -> str:
    """The model at ``source`` with one weight value moved by 1e-3: ``mlp.down_proj`` of layer
    3, flat index 1 (what a targeted edit or a patched row looks like)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.view(-1)[1] += 1e-3
    model.save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[str, str]:
    """A tiny model and its copy with one value changed."""
    folder = tmp_path_factory.mktemp("twins")
    original = save_tiny(folder / "original", **WIDE)
    return original, edited_copy(original, folder / "edited")


def load(path: str, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_one_changed_value_changes_the_fingerprint(twins):
    original, edited = (load(path) for path in twins)
    assert model_fingerprint(original) != model_fingerprint(edited)
    assert sampled_fingerprint(original) == sampled_fingerprint(edited)  # what the old one missed
    assert model_fingerprint(original).startswith("xxh3:")
    assert is_sampled(sampled_fingerprint(original)) and not is_sampled(model_fingerprint(original))


def test_the_same_weights_loaded_twice_and_offloaded_to_disk_are_the_same(twins, tmp_path):
    original, edited = twins
    fingerprint = model_fingerprint(load(original))
    assert model_fingerprint(load(original)) == fingerprint
    offloaded = offload_to_disk(original, tmp_path / "offload")
    assert any(t.is_meta for t in offloaded.state_dict().values())
    assert model_fingerprint(offloaded) == fingerprint
    edited_offloaded = offload_to_disk(edited, tmp_path / "offload-edited")
    assert model_fingerprint(edited_offloaded) == model_fingerprint(load(edited)) != fingerprint


def offload_to_disk(path: str, folder: Path):
    """Layers 1 and 2 on disk, the rest on the CPU, as ``device_map`` with offloading does."""
    places = {"model.layers.1": "disk", "model.layers.2": "disk"}
    device_map = {
        name: places.get(name, "cpu")
        for name in ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
        + [f"model.layers.{i}" for i in range(4)]
    }
    return load(path, device_map=device_map, offload_folder=str(folder))


def test_a_weight_nobody_holds_is_an_error_not_a_guess(twins):
    model = load(twins[0])
    layer = model.model.layers[2].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(FingerprintError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        model_fingerprint(model)


def test_chains_searched_on_one_model_are_refused_on_its_edited_copy(twins, task_dir, tmp_path):
    original, edited = twins
    store = tmp_path / "cola.db"
    assert main(search_command(store, original, task_dir, limit=2)) == 0
    ColaLM(pretrained=original, chains=f"store:{store}", device="cpu")  # its own model: fine
    with pytest.raises(ChainSourceError, match="has no run of this model"):
        ColaLM(pretrained=edited, chains=f"store:{store}", device="cpu")
    with pytest.raises(ChainSourceError, match="not for the loaded"):
        ColaLM(pretrained=edited, chains=f"store:{store};run=1", device="cpu")


def test_under_disk_offload_too(twins, task_dir, tmp_path):
    """Every weight offloaded to disk through lm-eval's own ``parallelize``: the store still
    knows the original from its edited copy."""
    original, edited = twins
    store = tmp_path / "cola.db"
    assert main(search_command(store, original, task_dir, limit=2)) == 0

    def offloaded(path: str, folder: str) -> ColaLM:
        options = dict(
            parallelize=True, max_cpu_memory="1MB", offload_folder=str(tmp_path / folder)
        )
        try:
            return ColaLM(pretrained=path, chains=f"store:{store}", device="cpu", **options)
        except SafetensorError as err:
            if transformers.__version__.startswith("4.") and "device disk is invalid" in str(err):
                pytest.skip(f"lm-eval's parallelize offloading fails on transformers 4.57: {err}")
            raise

    lm = offloaded(original, "original")
    assert all(t.is_meta for t in lm.model.state_dict().values())
    assert len(lm.source._chains) == 2
    with pytest.raises(ChainSourceError, match="has no run of this model"):
        offloaded(edited, "edited")


def age(store: Path, sampled: str) -> None:
    """Make the store look written by an earlier release: its model under the sampled scheme,
    its run named as that release named it by default."""
    with Store(str(store)) as opened, opened.session() as session:
        model = session.scalars(select(Model)).one()
        run = session.scalars(select(Run)).one()
        model.fingerprint = sampled
        settings = {"method": run.method, "budget": run.budget, "seed": run.seed, **run.settings}
        run.name = default_run_name(
            run.task.name, run.method, sampled, run.task.config_hash, settings
        )


def search_command(store: Path, model: str, task_dir: str, limit: int) -> list[str]:
    return ["search", "--model_args", f"pretrained={model}", "--device", "cpu", "--tasks",
            "cola_mc", "--include_path", task_dir, "--budget", "3", "--limit", str(limit),
            "--store", str(store)]  # fmt: skip


def test_a_store_of_the_sampled_scheme_is_recognised_and_re_registered(twins, task_dir, tmp_path):
    original = twins[0]
    other = save_tiny(tmp_path / "other", seed=1, **WIDE)
    store = tmp_path / "cola.db"
    assert main(search_command(store, original, task_dir, limit=2)) == 0
    sampled = sampled_fingerprint(load(original))
    age(store, sampled)
    with pytest.raises(ChainSourceError, match=r"sampled.*cola refingerprint .*--store"):
        ColaLM(pretrained=original, chains=f"store:{store}", device="cpu")

    def refingerprint(model: str) -> int:
        return main(["refingerprint", "--model_args", f"pretrained={model}", "--store", str(store)])

    assert refingerprint(other) == 0  # other weights, another sampled fingerprint: no change
    with Store(str(store), read_only=True).session() as session:
        assert session.scalars(select(Model.fingerprint)).one() == sampled
    assert refingerprint(original) == 0
    assert (
        len(ColaLM(pretrained=original, chains=f"store:{store}", device="cpu").source._chains) == 2
    )
    # renamed as today's search names it: the same command grows the old run
    assert main(search_command(store, original, task_dir, limit=3)) == 0
    with Store(str(store), read_only=True).session() as session:
        (run,) = session.scalars(select(Run)).all()
        assert run.n_documents == 3


def test_a_predictor_file_and_a_cache_table_of_the_sampled_scheme_are_re_registered(
    twins, tmp_path
):
    from lm_eval_cola.predict import predictors as P

    original = twins[0]
    lm = ColaLM(pretrained=original, chain="0.1.1.3", device="cpu")
    sampled = sampled_fingerprint(lm.model)
    static = P.PredictorInfo(
        kind="static", model={**vars(lm.identity), "fingerprint": sampled}, task="cola_mc",
        split="test", metric="acc", candidates=["0-3"], static_chain="0-3", features={"layer": 2},
        training_hashes=[], options={},
    )  # fmt: skip
    path = P.save(P.PREDICTORS.get("static")(static), tmp_path / "static.pt")
    with pytest.raises(ChainSourceError, match=r"cola refingerprint .*--predictors"):
        ColaLM(pretrained=original, chains=f"predictor:{path}", device="cpu")
    cache = tmp_path / "lmcache_rank0.db"
    old = f"cola_{lm.cache_namespace(sampled)}"
    with sqlite3.connect(cache) as connection:
        connection.execute(f'CREATE TABLE "{old}" (key TEXT PRIMARY KEY, value BLOB)')
        connection.execute(f'INSERT INTO "{old}" VALUES (?, ?)', ("request", b"result"))
    args = ["refingerprint", "--model_args", f"pretrained={original},chain=0.1.1.3"]
    assert main([*args, "--predictors", str(path), "--use_cache", str(cache)]) == 0
    ColaLM(pretrained=original, chains=f"predictor:{path}", device="cpu")
    with sqlite3.connect(cache) as connection:
        table = f"cola_{lm.cache_namespace()}"
        assert connection.execute(f'SELECT value FROM "{table}"').fetchall() == [(b"result",)]
