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
    assert r.returncode == 0 and "3 kept, 0 broken" in r.stdout, r.stdout + r.stderr


def lint_with_an_import(tmp_path, module: str, line: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of featx whose ``module`` gained the import ``line``."""
    shutil.copytree(ROOT / "featx", tmp_path / "featx", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "featx" / f"{module}.py", "a") as f:
        f.write(f"\n{line}  # noqa\n")
    return lint_imports(tmp_path)


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: the store (a low layer) importing the runner is refused."""
    r = lint_with_an_import(tmp_path, "store", "from featx import extract")
    assert r.returncode != 0 and "featx.store is not allowed to import featx.extract" in r.stdout, r.stdout


def test_an_optional_library_outside_its_adapter_breaks_the_contract(tmp_path):
    """timm, open_clip and transformers are imported only inside their own adapters."""
    r = lint_with_an_import(tmp_path, "extractor", "import timm")
    assert r.returncode != 0 and "featx.extractor -> timm" in r.stdout, r.stdout
