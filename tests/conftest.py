"""Shared fixtures: tiny random models with a byte-level tokenizer, and local lm-eval tasks."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lm_eval_cola.store import engine as engines
from tests.tiny_models import tiny_model

SPECIALS = ["<pad>", "<s>", "</s>"]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``), each worker gets its own package cache, so that two
    workers never import the same data set into one folder at once, and one thread, so that
    the workers share the cores instead of fighting over them (subprocesses inherit both)."""
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is None:
        return
    home = os.environ.get("LM_EVAL_COLA_HOME")
    if home:
        os.environ["LM_EVAL_COLA_HOME"] = str(Path(home) / worker)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


#: The longest test files (minutes of real-model subprocesses), started first so that the
#: other workers fill the time beside them instead of waiting for them at the end.
LONGEST_FIRST = ("test_readme.py", "test_integration.py", "test_registration.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 3 specials + 256 bytes, built offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


VOCAB = len(SPECIALS) + 256


def save_tiny(path: Path, model_type: str = "llama", **overrides) -> str:
    model = tiny_model(model_type, vocab_size=VOCAB, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


MC_DOCS = [
    {"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": a}
    for i, (q, c, a) in enumerate(
        [
            ("Which is a colour?", ["red", "dog", "run"], "A"),
            ("Which animal barks?", ["cat", "dog", "fish"], "B"),
            ("What do we drink?", ["sand", "rock", "water"], "C"),
            ("Which is a number?", ["seven", "blue", "tree"], "A"),
            ("Which is a fruit?", ["car", "apple", "shoe"], "B"),
            ("Which one flies?", ["stone", "table", "bird"], "C"),
            ("Which is a colour?", ["red", "dog", "run"], "A"),  # same prompt as q0, own doc
        ]
    )
]
GEN_DOCS = [
    {"question": f"{a} plus {b} is", "answer": str(a + b)} for a, b in [(1, 2), (2, 3), (4, 4)]
]
TEXT_DOCS = [
    {"text": t} for t in ["the cat sat on the mat", "a dog ran in the park today", "hello"]
]

TASK_YAML = {
    "cola_mc": """
task: cola_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
metadata: {{version: 1.0}}
""",
    "cola_gen": """
task: cola_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
metadata: {{version: 1.0}}
""",
    "cola_text": """
task: cola_text
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
metadata: {{version: 1.0}}
""",
}
TASK_DOCS = {"cola_mc": MC_DOCS, "cola_gen": GEN_DOCS, "cola_text": TEXT_DOCS}

#: A multiple-choice task with disjoint train and test splits, for predictors.
SPLIT_YAML = """
task: cola_split
dataset_path: json
dataset_kwargs: {{data_files: {{train: {train}, test: {test}}}}}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list: [{{metric: acc}}]
metadata: {{version: 1.0}}
"""
WORDS = ["red", "dog", "sea", "sun", "tree", "cat", "rain", "hill", "milk", "road", "fish", "gold"]
SPLIT_DOCS = [
    {"question": f"which word is {WORDS[i % 12]} {i}?",
     "choices": [WORDS[(i + j) % 12] for j in range(3)], "answer": i % 3}
    for i in range(22)
]  # fmt: skip


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> str:
    """A folder of local lm-eval tasks, one per output type and one with train and test
    splits, for ``--include_path``."""
    root = tmp_path_factory.mktemp("tasks")
    for name, template in TASK_YAML.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in TASK_DOCS[name]))
        (root / f"{name}.yaml").write_text(template.format(data=json.dumps(str(data))))
    splits = {"train": SPLIT_DOCS[:14], "test": SPLIT_DOCS[14:]}
    for split, docs in splits.items():
        (root / f"cola_split_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    paths = {split: json.dumps(str(root / f"cola_split_{split}.jsonl")) for split in splits}
    (root / "cola_split.yaml").write_text(SPLIT_YAML.format(**paths))
    return str(root)


# -- backends ---------------------------------------------------------------------------------


def _no_postgres(reason: str) -> None:
    """Skip, saying why; a failure where ``COLA_REQUIRE_POSTGRES`` is set (CI), so that the
    PostgreSQL tests cannot quietly drop out."""
    if os.environ.get("COLA_REQUIRE_POSTGRES"):
        pytest.fail(f"{reason}, and COLA_REQUIRE_POSTGRES is set")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_server() -> str:
    """The PostgreSQL URL to test against, or a skip that says why there is none."""
    url = os.environ.get("COLA_TEST_POSTGRES_URL")
    if not url:
        _no_postgres("COLA_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against")
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        _no_postgres(f"PostgreSQL at COLA_TEST_POSTGRES_URL is unreachable: {err.orig}")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A store URL on the server whose tables live in a new schema, dropped afterwards, so
    tests never see each other's rows and reruns start clean."""
    schema = f"cola_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(postgres_server).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


NEXT_MIGRATION = '''"""A later release's migration, made by tests/test_store.py."""

import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("note", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "note")
'''


@pytest.fixture
def next_release(tmp_path: Path) -> Path:
    """The store's migrations plus one more: what the next release would ship."""
    migrations = tmp_path / "migrations"
    shutil.copytree(engines.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "0099_next.py").write_text(NEXT_MIGRATION)
    return migrations
