"""A non-editable install in a new venv: the base (OpenAI path) installs no torch, ships its data,
and `tunekit` works from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

CSV = "text,label\n" + "".join(f"{w} app,{'positive' if i % 2 else 'negative'}\n"
                               for i, w in enumerate("great awful love hate fine slow best bad nice buggy".split() * 2))
BUILD = """input: reviews.csv
out: data
system: You label app reviews.
user: "Review: {{ text }}"
assistant: "{{ label }}"
valid_fraction: 0.25
stratify: label
seed: 1
"""


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(d / "dist")], check=True, capture_output=True, cwd=d, timeout=600)
    wheel = next((d / "dist").glob("tunekit_ft-*.whl"))
    # through uv when it is there (make setup installs it, and `make` installs through it too): ~10 s, not ~80
    uv = Path(sys.executable).parent / "uv"
    if uv.is_file():
        subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(d / "venv")], check=True, timeout=300)
        installer = [str(uv), "pip", "install", "--python", str(d / "venv/bin/python")]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(d / "venv")], check=True, timeout=300)
        installer = [str(d / "venv/bin/pip"), "install"]
    proc = subprocess.run([*installer, "-q", "-c", str(ROOT / "requirements/constraints.txt"), str(wheel)],
                          capture_output=True, text=True, cwd=d, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "venv"


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_base_install_has_no_torch_and_ships_its_data(base_venv, tmp_path):
    code = ("import importlib.util as u, pathlib, sys; "
            "assert u.find_spec('torch') is None and u.find_spec('transformers') is None; "
            "import tunekit, train; "
            "assert 'site-packages' in tunekit.__file__, tunekit.__file__; "
            "assert (pathlib.Path(train.__path__[0]) / 'templates/smollm2_training.jinja').is_file(); "
            "from tunekit.constants import PRICES_FILE; assert PRICES_FILE.is_file()")
    proc = run(base_venv, "python", "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tunekit_works_from_an_empty_directory(base_venv, tmp_path):
    (tmp_path / "reviews.csv").write_text(CSV)
    (tmp_path / "build.yaml").write_text(BUILD)
    assert "subcommands:" in run(base_venv, "tunekit", "--help", cwd=tmp_path).stdout
    built = run(base_venv, "tunekit", "build", "--config", "build.yaml", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (tmp_path / "data/train.jsonl").is_file() and (tmp_path / "data/report.json").is_file()
    assert run(base_venv, "tunekit", "validate", "data/train.jsonl", cwd=tmp_path).returncode == 0
    stats = run(base_venv, "tunekit", "stats", "data/train.jsonl", "--no-plot", cwd=tmp_path)
    assert stats.returncode == 0 and "$3.00 per 1M training tokens" in stats.stdout, stats.stdout + stats.stderr


def test_a_command_that_needs_an_extra_names_it(base_venv, tmp_path):
    train = run(base_venv, "tunekit", "train", "cfg.yaml", cwd=tmp_path)
    assert train.returncode == 2 and 'pip install "tunekit-ft[train]"' in train.stderr and "Traceback" not in train.stderr
    api = run(base_venv, "tunekit", "api", "--help", cwd=tmp_path)
    assert api.returncode == 2 and 'pip install "tunekit-ft[serve]"' in api.stderr and "Traceback" not in api.stderr


def test_demo_starts_from_an_empty_directory(base_venv, tmp_path):
    """The example ships inside the wheel: `tunekit demo` copies it and plans every stage."""
    proc = run(base_venv, "tunekit", "demo", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("build_cards.yaml", "sft_cpu.yaml", "serve_cards.yaml", "compare_cards.yaml", "data/train.csv",
                 "data/test.csv", "data/LICENSE"):
        assert (tmp_path / "configs/banking77" / name).is_file(), name
    plan = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert plan == ["# base model", "# build", "# build the held-out test set", "# validate", "# stats", "# train",
                    "# compare"], proc.stdout
    assert "site-packages/train/sft.py --config configs/banking77/sft_cpu.yaml" in proc.stdout
    again = run(base_venv, "tunekit", "demo", "--dry-run", cwd=tmp_path)
    assert again.returncode == 0 and "copied" not in again.stdout


def test_every_package_of_the_checkout_is_installed():
    """pyproject lists its packages (configs/ ships as tunekit.examples): a new one must be added there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("tunekit", "data_prep", "train", "serve")
             for p in (ROOT / top).rglob("__init__.py") if "vllm_cpu_lora" not in p.parts}
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"
    assert "tunekit.examples" in listed
