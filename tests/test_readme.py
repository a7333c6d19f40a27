"""The README, followed top to bottom as a new user would: every command in its bash and
Python blocks runs as written, in an empty folder with nothing beside it, on the embedded
default model, at tiny sizes (``--limit`` and ``--budget`` shrunk). Installing and the test
suite itself (``pip``, ``venv``, ``tox``) are the only steps left out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
#: Steps of a command line that set up the environment this test already runs in.
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "tox", "COLA_TEST_POSTGRES")
TINY = {"--limit": "4", "--budget": "3", "--k": "2"}


def steps(text: str) -> list[tuple[str, str]]:
    """("bash", command) and ("python", code) in the README's order, set-up steps left out."""
    found = []
    for kind, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if kind == "python":
            found.append((kind, body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            commands = [c.strip() for c in line.split(" && ")]
            found += [(kind, tiny(c)) for c in commands if c and not c.startswith(SETUP)]
    return found


def tiny(command: str) -> str:
    for flag, value in TINY.items():
        command = re.sub(rf"{flag} \d+", f"{flag} {value}", command)
    return command


def test_the_steps_are_read_from_every_block():
    found = steps(README.read_text())
    commands = [c for kind, c in found if kind == "bash"]
    assert commands[0] == "cola data import --tasks arc_easy"
    assert any(c.startswith("lm_eval --model cola") for c in commands)
    assert any(c.startswith("cola predict train") for c in commands)
    assert not any(c.startswith(SETUP) for c in commands)
    assert all("--limit 4" in c for c in commands if "--limit" in c)
    assert sum(kind == "python" for kind, _ in found) >= 1


@pytest.mark.integration
def test_every_readme_command_works_as_written(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for name in ("HF_DATASETS_CACHE", "COLA_SHARED_DATA"):  # a user's clone has no ../shared
        env.pop(name, None)
    for kind, step in steps(README.read_text()):
        command = ["bash", "-c", step] if kind == "bash" else [sys.executable, "-c", step]
        done = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, f"{step}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if step.startswith(("lm_eval", "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval")):
            assert re.search(r"\|\s*(acc|exact_match)\s*\|", done.stdout), done.stdout[-2000:]
    assert (folder / "figures").is_dir() and (folder / "predictors" / "knn.pt").is_file()
