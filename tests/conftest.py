"""Shared fixtures: tiny generated image trees and a small, reproducible backbone.

Nothing here touches the network: backbones are randomly initialised (and saved to a file
when a test needs the same weights twice), images are generated in tmp_path.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

BACKBONE = "mobilenet_v2"  # small and fast at 32 px


def make_image(path: Path, color, size=(40, 36), noise: int = 30, seed: int = 0) -> Path:
    """A JPEG/PNG of a base colour with a little noise (so classes are separable)."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.asarray(color, dtype=np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """data/{train,val}/{red,blue}/*.jpg: 6 + 3 images per class, separable by colour."""
    root = tmp_path / "data"
    colors = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    for split, n in (("train", 6), ("val", 3)):
        for c, rgb in colors.items():
            for i in range(n):
                # a fixed seed per image (hash() of a str changes between processes)
                make_image(root / split / c / f"{i}.jpg", rgb, seed=zlib.crc32(f"{split}/{c}/{i}".encode()))
    return root


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A saved random MobileNetV2 state dict: the same weights every time it is loaded."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mnv2_random.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


def small_config(weights="none", **kw):
    from featx.extractor import ExtractConfig

    kw.setdefault("image_size", 32)
    kw.setdefault("batch_size", 4)
    kw.setdefault("workers", 0)
    kw.setdefault("backbone", BACKBONE)
    return ExtractConfig(weights=str(weights), **kw)


def write_store(path, X, y, classes, tap="features", backbone="mobilenet_v2", sha="abc"):
    """A complete feature file of the given rows, as `featx extract` would write it."""
    from featx.store import StoreWriter

    header = {"backbone": backbone, "weights": "w", "weights_sha256": sha, "weights_path": "",
              "preprocessing": "{}", "pooling": "{}", "taps": "{}", "fingerprint": str(path), "source": "{}"}
    w = StoreWriter(path, header, len(X), {tap: {"layer": tap, "pool": "avg", "dim": X.shape[1]}}, unit_items=len(X))
    w.prepare(overwrite=True)
    w.add(0, len(X), {tap: X}, y, [f"i{k}" for k in range(len(X))], [], [])
    w.finalize(classes, tap)
    return path


@pytest.fixture(scope="session", autouse=True)
def session_feature_cache(tmp_path_factory):
    """Module- and session-scoped fixtures share one feature cache, never the repository's
    cache/features/ (they are set up before any test's own cache below).  Every test shares
    one inductor cache too (featx respects a TORCHINDUCTOR_CACHE_DIR the user set): compiled
    code does not depend on the test, and a cold compile per test doubled the suite's time."""
    saved = {name: os.environ.get(name) for name in ("FEATX_CACHE", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["FEATX_CACHE"] = str(tmp_path_factory.mktemp("featx-cache-session"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor-session"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def feature_cache(tmp_path_factory, monkeypatch, session_feature_cache):
    """Each test gets its own feature cache, so that no test sees another's vectors."""
    path = tmp_path_factory.mktemp("featx-cache")
    monkeypatch.setenv("FEATX_CACHE", str(path))
    return path


@pytest.fixture
def run_cli():
    """Invoke the click app; returns the Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from featx.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


# torch.compile's CPU backend builds C++ kernels: without a compiler featx runs eagerly (and
# tests/test_graph.py checks that fallback); the tests of compiled results need one.
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                                    reason="no C++ compiler for torch.compile")
