"""Library code keeps its hands off global state, and says what went wrong (issue 19, item 4)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from featx.errors import FeatxError
from featx.sources import folder_source

from conftest import BACKBONE, make_image, small_config


def _global_state():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def test_finetune_and_extract_leave_the_global_generators_alone(image_tree, tmp_path):
    """finetune reseeded Python's, numpy's and torch's global generators; DataLoaders drew
    their workers' base seed from torch's."""
    from featx.extract import extract
    from featx.finetune import FinetuneConfig, finetune

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    before = _global_state()
    cfg = FinetuneConfig(backbone=BACKBONE, weights="none", image_size=32, batch_size=4, workers=0, epochs=1,
                         warmup_epochs=0, head="mlp")
    first = finetune(folder_source(image_tree, "train"), folder_source(image_tree, "val"), tmp_path / "a", cfg,
                     log=lambda s: None)
    extract(folder_source(image_tree, "val"), tmp_path / "f.h5", small_config())
    after = _global_state()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(99)  # another global state: the run is the same (its draws are its own)
    second = finetune(folder_source(image_tree, "train"), folder_source(image_tree, "val"), tmp_path / "b", cfg,
                      log=lambda s: None)
    assert first["history"][0]["train_loss"] == second["history"][0]["train_loss"]


def test_extract_leaves_the_callers_config_as_it_was(image_tree, tmp_path):
    """extract() filled in the batch size (and the device) on the config it was given."""
    from dataclasses import asdict

    from featx.extract import extract

    config = small_config(batch_size=None, device="auto", cache=None, compile="off")
    before = asdict(config)
    result = extract(folder_source(image_tree, "val"), tmp_path / "f.h5", config)
    assert result.n_rows > 0 and asdict(config) == before and config.batch_size is None


def test_importing_featx_changes_no_pillow_setting_and_truncated_files_still_fail(tmp_path):
    code = ("from PIL import ImageFile; ImageFile.LOAD_TRUNCATED_IMAGES = True; import featx.decode; "
            "print(ImageFile.LOAD_TRUNCATED_IMAGES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    from PIL import Image, ImageFile

    from featx.decode import Decoded
    from featx.preprocess import Preprocess

    path = tmp_path / "cut.png"
    make_image(path, (90, 10, 10), size=(64, 64))
    path.write_bytes(path.read_bytes()[:-200])  # cut short
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what an application may have set
    try:
        from featx.sources import files_source

        _, _, err = Decoded(files_source([str(path)]), Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3))[0]
        assert err is not None and ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS == 89478485
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_weights_read_errors_say_what_happened(tmp_path):
    from featx.weights import read_tensors

    with pytest.raises(FeatxError, match=f"cannot read {tmp_path}: it is a folder"):
        read_tensors(tmp_path)
    with pytest.raises(FeatxError, match="no such file or folder"):
        read_tensors(tmp_path / "gone.pt")
    (tmp_path / "x.pt").write_text("text")
    with pytest.raises(FeatxError, match="it is not a PyTorch weights file"):
        read_tensors(tmp_path / "x.pt")


def test_a_damaged_output_file_is_called_damaged(image_tree, tmp_path, run_cli):
    args = ["extract", image_tree, "--split", "val", "-b", BACKBONE, "--weights", "none", "--image-size", "32",
            "--workers", "0"]
    assert run_cli(*args, "--out", tmp_path / "f.h5").exit_code == 0
    data = (tmp_path / "f.h5").read_bytes()
    (tmp_path / "f.h5").write_bytes(data[: len(data) // 3])
    r = run_cli(*args, "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "is a damaged HDF5 file" in r.stderr and "other settings" not in r.stderr


def test_the_backbone_listing_says_why_a_width_is_unknown(monkeypatch):
    from featx import adapters, taps

    def broken(*a, **k):
        raise RuntimeError("no forward here")

    monkeypatch.setattr(taps, "widths", broken)
    info = adapters.describe(adapters.backbone(BACKBONE))
    assert info["dim"] is None and info["error"] == "RuntimeError: no forward here"


def test_predict_checks_the_weights_before_it_compiles(image_tree, tmp_path, run_cli, monkeypatch):
    from featx import bundle, extractor

    r = run_cli("extract", image_tree, "--split", "train", "-b", BACKBONE, "--weights", "none", "--image-size", "32",
                "--workers", "0", "--out", tmp_path / "f.h5")
    assert r.exit_code == 0
    assert run_cli("fit", tmp_path / "f.h5", "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    b = bundle.load(tmp_path / "m.skops")
    bundle.save(tmp_path / "other.skops", b.pipeline, {**b.meta, "weights_sha256": "0" * 64})
    compiled = []
    monkeypatch.setattr(extractor, "compile_taps", lambda *a, **k: compiled.append(1))
    r = run_cli("predict", tmp_path / "other.skops", image_tree / "val", "--compile", "on", "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and "are not the ones the model was trained with" in r.stderr
    assert compiled == []
