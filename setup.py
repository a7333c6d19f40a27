"""Packaging for lm-eval-cola.

``search/``, ``store/`` and ``predict/`` sit at the top of the repository but install as
``lm_eval_cola.search``, ``lm_eval_cola.store`` and ``lm_eval_cola.predict``, so nothing
named ``search``, ``store`` or ``predict`` lands in users' site-packages.
``lm_eval_cola.pth`` is copied to the root of site-packages
(wheel and editable installs) so that the stock ``lm_eval`` CLI finds ``--model cola``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
PTH = "lm_eval_cola.pth"


class build_py_with_pth(build_py):
    """Also put the registration hook (a .pth file) at the root of the built tree."""

    def run(self):
        super().run()
        self.copy_file(str(HERE / "lm_eval_cola" / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class editable_wheel_with_pth(editable_wheel):
    """Editable installs skip build_py's extra output, so add the hook to the wheel here."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(HERE / "lm_eval_cola" / PTH), str(Path(unpacked_wheel) / PTH))
        return result


setup(
    name="lm-eval-cola",
    version="0.1.0",
    description="Chain-of-layers (CoLa) test-time depth adaptation for lm-evaluation-harness",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "lm_eval_cola",
        "lm_eval_cola.executor",
        "lm_eval_cola.search",
        "lm_eval_cola.store",
        "lm_eval_cola.predict",
    ],
    package_dir={
        "lm_eval_cola": "lm_eval_cola",
        "lm_eval_cola.search": "search",
        "lm_eval_cola.store": "store",
        "lm_eval_cola.predict": "predict",
    },
    package_data={
        "lm_eval_cola": [
            PTH,
            "data/README.md",
            "data/arc_easy/*.jsonl.gz",
            "task_configs/*.yaml",
            "task_configs/*_yaml",
            "task_configs/README.md",
        ],
        "lm_eval_cola.store": ["migrations/*.py", "migrations/versions/*.py"],
    },
    install_requires=[
        "lm-eval>=0.4.13,<0.5",  # the HFLM surface tests/test_structure.py checks
        "torch>=2.4",
        "transformers>=4.57",
        "accelerate>=1.0",
        "datasets>=3.0",
        "optuna>=4.0",
        "cmaes>=0.10",
        "scipy>=1.10",
        "sqlalchemy>=2.0",
        "alembic>=1.13",
        "pandas>=2.0",
        "gguf>=0.10",
        "safetensors>=0.4",
        "tqdm>=4.66",  # TQDM_* environment settings (tests)
        "xxhash>=3.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "peft>=0.10",
            "psycopg[binary]>=3.1",
        ],
        "lint": ["ruff>=0.6"],
    },
    entry_points={
        "console_scripts": ["cola = lm_eval_cola.cli:main"],
        "lm_eval.models": ["cola = lm_eval_cola.lm:ColaLM"],
    },
    cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth},
)
