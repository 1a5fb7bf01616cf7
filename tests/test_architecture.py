"""The layers of docs/ARCHITECTURE.md hold: import-linter's contract in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("importlinter", reason="scripts/setup.sh installs import-linter (the test extra)")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def test_layers_contract_is_kept():
    r = lint_imports(ROOT)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout + r.stderr


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: the store (a low layer) importing the runner is refused."""
    shutil.copytree(ROOT / "featx", tmp_path / "featx", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "featx" / "store.py", "a") as f:
        f.write("\nfrom featx import extract  # noqa\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0 and "featx.store is not allowed to import featx.extract" in r.stdout, r.stdout
