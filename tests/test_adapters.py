"""Backbones of timm, open_clip and Hugging Face transformers behind one adapter protocol.

Offline: seeded random initialisation, or weights the library itself saved.  For each source
featx's default tap must equal the library's own embedding of the same preprocessed batch,
the token poolings must equal hand-written ones, and the CLI journey must run through.
"""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch

from featx.extractor import FeatureExtractor
from featx.store import FeatureStore

from conftest import needs_compiler, small_config

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


def cosine(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double()).min())


def batch(n=2, size=32, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny DINOv2 saved by transformers itself (``save_pretrained``), as a user's folder."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("hf") / "dino-tiny"
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny CLIP architecture registered with open_clip (``add_model_config``), as a user's
    own config would be: ``open_clip:featx-tiny-clip``."""
    import json

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    path = tmp_path_factory.mktemp("clip") / "featx-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "open_clip:featx-tiny-clip"


def extractor(backbone, weights="none", **kw) -> FeatureExtractor:
    return FeatureExtractor(small_config(weights=weights, backbone=backbone, compile="off", channels_last=False, **kw))


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:resnet18"])
def test_timm_default_tap_is_timms_pre_logits(name):
    ex = extractor(name, image_size=None)
    x = batch(size=ex.pre.crop)
    torch.manual_seed(0)  # featx's `--weights none --seed 0`: the same network
    ref = timm.create_model(name.split(":")[1], pretrained=False).eval()
    with torch.no_grad():
        own = ref.forward_head(ref.forward_features(ex.normalize(x)), pre_logits=True)
    assert ex.default_tap == "embedding" and cosine(ex(x)["embedding"], own) > 0.9999


def test_token_poolings_match_hand_written_ones():
    ex = FeatureExtractor(small_config(backbone="timm:vit_tiny_patch16_224", layers=("blocks.11",),
                                       pools=("cls", "mean", "clsmean", "avg"), compile="off", image_size=None))
    x = batch(size=224)
    out = ex(x)
    m = ex.model
    with torch.no_grad():
        tokens = m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(ex.normalize(x))))))
    cls, patches = tokens[:, 0], tokens[:, 1:]  # vit_tiny: one prefix token
    assert cosine(out["blocks.11@cls"], cls) > 0.9999
    assert cosine(out["blocks.11@mean"], patches.mean(1)) > 0.9999
    assert cosine(out["blocks.11@clsmean"], torch.cat([cls, patches.mean(1)], 1)) > 0.9999
    assert cosine(out["blocks.11@avg"], tokens.mean(1)) > 0.9999  # every token alike, as before
    assert out["blocks.11@clsmean"].shape == (2, 384)


def test_a_token_pooling_on_a_feature_map_is_one_sentence():
    from featx.errors import FeatxError

    with pytest.raises(FeatxError, match="--pool cls pools a transformer's tokens"):
        FeatureExtractor(small_config(backbone="timm:resnet18", layers=("layer2",), pools=("cls",), compile="off"))


def test_open_clip_default_tap_is_encode_image():
    ex = extractor("open_clip:ViT-B-32", image_size=None, batch_size=2)
    x = batch(size=224)
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    with torch.no_grad():
        own = ref.encode_image(ex.normalize(x))
    assert ex.pre.crop == 224 and ex.pre.mean[0] == pytest.approx(0.48145466)  # the tower's own preprocessing
    assert cosine(ex(x)["embedding"], own) > 0.9999
    assert ex.dims["embedding"] == 512


def test_hf_default_tap_is_the_pooled_output_of_a_saved_model(dino_folder):
    from transformers import Dinov2Model

    from featx.weights import sha256_of

    ex = extractor(f"hf:{dino_folder}", weights=str(dino_folder), image_size=None)
    x = batch(size=32)
    ref = Dinov2Model.from_pretrained(dino_folder).eval()
    with torch.no_grad():
        own = ref(pixel_values=ex.normalize(x)).pooler_output
    assert cosine(ex(x)["embedding"], own) > 0.9999
    assert ex.weights.sha256 == sha256_of(dino_folder / "model.safetensors")  # the digest of what was loaded


def test_timm_weights_saved_by_timm_load_by_path(tmp_path):
    """``timm.models.save_for_hf`` (push_to_hub's save_pretrained) writes a folder featx takes as --weights."""
    from timm.models import save_for_hf

    from featx.weights import sha256_of

    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    save_for_hf(model, tmp_path / "r18", safe_serialization=True)
    ex = extractor("timm:resnet18", weights=str(tmp_path / "r18"))
    x = batch(size=32)
    with torch.no_grad():
        own = model.forward_head(model.forward_features(ex.normalize(x)), pre_logits=True)
    assert cosine(ex(x)["embedding"], own) > 0.9999
    assert ex.weights.sha256 == sha256_of(tmp_path / "r18" / "model.safetensors")


def test_a_missing_library_is_one_sentence(run_cli, tmp_path, monkeypatch, image_tree):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm does on import
    r = run_cli("extract", image_tree, "--backbone", "timm:resnet18", "--weights", "none", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "pip install 'featx[timm]'" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "f.h5").exists()


def test_unknown_names_are_refused_with_close_matches(run_cli, tmp_path, image_tree):
    r = run_cli("extract", image_tree, "--backbone", "timm:resnet19", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "unknown timm model 'resnet19'" in r.stderr and "resnet18" in r.stderr
    r = run_cli("extract", image_tree, "--backbone", "clip:ViT-B-32", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "unknown source 'clip'" in r.stderr
    r = run_cli("extract", image_tree, "--backbone", "open_clip:ViT-B-32/nope", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "open_clip has no weights 'nope'" in r.stderr


def test_listing_other_sources_builds_no_model(run_cli):
    r = run_cli("backbones", "--source", "timm", "--filter", "vit_small_patch14_dinov2*")
    assert r.exit_code == 0 and "timm:vit_small_patch14_dinov2.lvd142m" in r.stdout.split()
    r = run_cli("backbones", "--source", "open_clip", "--filter", "ViT-B-32/*")
    assert r.exit_code == 0 and "open_clip:ViT-B-32/laion2b_s34b_b79k" in r.stdout.split()
    r = run_cli("backbones", "timm:vit_tiny_patch16_224")
    assert r.exit_code == 0 and "default tap embedding (192 features)" in r.stdout and "11 blocks.11" in r.stdout


def ok(r):
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("source", ["timm", "hf", "open_clip"])
def test_the_journey_extract_fit_predict_finetune_extract(source, image_tree, tmp_path, run_cli, dino_folder,
                                                          tiny_clip):
    """As the README shows it, fed from one command into the next, for a model of each source."""
    bk = {"timm": ["--backbone", "timm:resnet18", "--weights", "none", "--image-size", "32"],
          "hf": ["--backbone", f"hf:{dino_folder}", "--weights", str(dino_folder)],
          "open_clip": ["--backbone", tiny_clip, "--weights", "none"]}[source]
    common = [*bk, "--batch-size", "4", "--workers", "0"]
    ok(run_cli("extract", image_tree, "--split", "train", *common, "--out", tmp_path / "train.h5"))
    ok(run_cli("extract", image_tree, "--split", "val", *common, "--out", tmp_path / "val.h5"))
    with FeatureStore(tmp_path / "train.h5") as fs:
        assert fs.attrs["backbone"] == bk[1] and fs.default_tap == "embedding" and fs.attrs["weights_sha256"]
    ok(run_cli("fit", tmp_path / "train.h5", "--clf", "logreg", "--search", "none", "--out", tmp_path / "m.skops"))
    ok(run_cli("evaluate", tmp_path / "m.skops", tmp_path / "val.h5"))
    ok(run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--out", tmp_path / "p.csv"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 6 and all(r["predicted"] in ("red", "blue") for r in rows)
    ok(run_cli("finetune", image_tree, *common, "--epochs", "1", "--unfreeze", "1", "--out", tmp_path / "run"))
    w = tmp_path / "run" / "backbone.pt"
    ok(run_cli("extract", image_tree, "--split", "val", *[*bk[:2], "--weights", w], "--batch-size", "4",
               "--workers", "0", "--out", tmp_path / "tuned.h5"))
    with FeatureStore(tmp_path / "tuned.h5") as fs:
        assert fs.features().shape[0] == 6 and np.isfinite(fs.features()).all()
    ok(run_cli("predict", w, image_tree / "val", "--out", tmp_path / "p2.csv"))
    assert len(list(csv.DictReader(open(tmp_path / "p2.csv")))) == 6


def test_the_feature_cache_answers_a_timm_rerun(image_tree, tmp_path):
    from featx.extract import extract
    from featx.sources import folder_source

    src = folder_source(image_tree, "val")
    cfg = small_config(backbone="timm:resnet18", compile="off")
    first = extract(src, tmp_path / "a.h5", cfg)
    again = extract(src, tmp_path / "b.h5", cfg)
    assert first.cache_hits == 0 and again.cache_hits == len(src)
    with FeatureStore(tmp_path / "a.h5") as a, FeatureStore(tmp_path / "b.h5") as b:
        assert np.array_equal(a.features(), b.features())


def test_predict_rebuilds_a_backbone_from_a_saved_folder(image_tree, tmp_path, run_cli):
    """The bundle records the folder the weights came from; predict finds them there."""
    from timm.models import save_for_hf

    torch.manual_seed(4)
    save_for_hf(timm.create_model("resnet18", pretrained=False).eval(), tmp_path / "r18", safe_serialization=True)
    common = ["--backbone", "timm:resnet18", "--weights", tmp_path / "r18", "--image-size", "32", "--workers", "0"]
    ok(run_cli("extract", image_tree, "--split", "train", *common, "--out", tmp_path / "f.h5"))
    ok(run_cli("fit", tmp_path / "f.h5", "--search", "none", "--out", tmp_path / "m.skops"))
    ok(run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--out", tmp_path / "p.csv"))
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 6
    (tmp_path / "r18").rename(tmp_path / "moved")
    r = run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and "are gone; pass their new location with --weights" in r.stderr
    ok(run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--weights", tmp_path / "moved",
               "--out", tmp_path / "p.csv"))


@needs_compiler
def test_a_network_fx_cannot_cut_is_compiled_whole(dino_folder):
    """transformers' models do not trace with FX: torch.compile takes the whole network, forward
    hooks keeping the taps, and the hooks go when the compiled graph does."""
    def make(compile):
        return FeatureExtractor(small_config(backbone=f"hf:{dino_folder}", weights=str(dino_folder), image_size=None,
                                             layers=("embedding", "encoder.layer.0"), pools=("clsmean",),
                                             compile=compile, cache=None))
    on, off = make("on"), make("off")
    on.prepare(8)
    assert on.compiled is not None
    x = batch(size=32)
    a, b = on(x), off(x)
    assert all(cosine(a[k], b[k]) > 0.9999 for k in b)
    on.compiled.close()
    assert not any(m._forward_hooks for m in on.model.modules())


def test_open_clip_silences_only_its_random_init_notice(tiny_clip, caplog):
    """``--weights none`` asked for random weights: open_clip's notice that it made them is not
    shown, and the root logger is left as it was (no handler added, other records pass)."""
    import logging

    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    with caplog.at_level(logging.WARNING):
        ex = extractor(tiny_clip)
        ex(batch(size=32))
        logging.getLogger().warning("a record of someone else")
    assert "No pretrained weights loaded" not in caplog.text and "a record of someone else" in caplog.text
    assert root.handlers == handlers and root.filters == filters


def test_hf_loading_leaves_transformers_progress_bars_as_they_were(dino_folder, capfd):
    log = transformers.utils.logging
    assert log.is_progress_bar_enabled()
    extractor(f"hf:{dino_folder}", weights=str(dino_folder)).model
    assert "Loading weights" not in capfd.readouterr().err and log.is_progress_bar_enabled()


def test_weights_not_in_the_cache_offline_are_one_sentence(run_cli, image_tree, tmp_path, monkeypatch, tiny_clip):
    """Offline and not cached: each source says where the weights are looked for and what to do."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    out = ["--workers", "0", "--out", tmp_path / "f.h5"]
    r = run_cli("extract", image_tree, "--backbone", "timm:resnet18.a1_in1k", *out)
    assert r.exit_code == 1 and "are not in the Hugging Face cache and could not be downloaded" in r.stderr
    assert "huggingface-cli download timm/resnet18.a1_in1k" in r.stderr and "Traceback" not in r.output
    r = run_cli("extract", image_tree, "--backbone", "hf:facebook/dinov2-small", *out)
    assert r.exit_code == 1 and "facebook/dinov2-small is not in the Hugging Face cache" in r.stderr
    r = run_cli("extract", image_tree, "--backbone", "open_clip:ViT-B-32/laion2b_s34b_b79k", *out)
    assert r.exit_code == 1 and "are not in open_clip's cache and could not be downloaded" in r.stderr
    assert not (tmp_path / "f.h5").exists()


def test_a_prefilled_hub_cache_works_offline(dino_folder, image_tree, tmp_path):
    """What README says for a machine without a network: copy a filled HF_HOME there.  A hub
    cache laid out as huggingface_hub lays it out, HF_HUB_OFFLINE set: the model is listed and
    extracts by its hub name."""
    import os
    import shutil
    import subprocess

    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--featx--dino-tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(dino_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    featx = [sys.executable, "-m", "featx"]
    r = subprocess.run([*featx, "backbones", "--source", "hf"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["hf:featx/dino-tiny"], r.stderr
    r = subprocess.run([*featx, "extract", image_tree / "val", "--backbone", "hf:featx/dino-tiny", "--workers", "0",
                        "--no-cache", "--compile", "off", "--out", tmp_path / "f.h5"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert fs.features().shape == (6, 32) and fs.attrs["weights"] == "featx/dino-tiny"
    r = subprocess.run([*featx, "backbones", "--source", "hf"], env={**env, "HF_HOME": str(tmp_path / "empty")},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and "any hf:ORG/NAME of a vision model works" in r.stderr


def test_sweep_probes_every_block_of_a_timm_transformer_with_token_poolings(image_tree, tmp_path, run_cli):
    """One forward pass over the twelve blocks of a ViT, each pooled two ways."""
    ok(run_cli("sweep", image_tree, "--backbone", "timm:vit_tiny_patch16_224", "--weights", "none", "--image-size",
               "32", "--pool", "cls", "--pool", "clsmean", "--workers", "0", "--out", tmp_path / "sw"))
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [(r["layer"], r["pool"]) for r in rows] == [(f"blocks.{i}", p) for i in range(12) for p in ("cls", "clsmean")]
    assert {r["pool"]: int(r["dim"]) for r in rows} == {"cls": 192, "clsmean": 384}
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)


def test_hf_token_poolings_leave_out_register_tokens(tmp_path):
    """DINOv2 with registers: ``mean`` averages the patch tokens only, without CLS and the
    register tokens, as the model's own hidden states show them."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(1)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_register_tokens=4)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "reg")
    ex = FeatureExtractor(small_config(backbone=f"hf:{tmp_path / 'reg'}", weights=str(tmp_path / "reg"),
                                       layers=("encoder.layer.1",), pools=("cls", "mean"), compile="off",
                                       image_size=None))
    x = batch(size=32)
    ref = Dinov2WithRegistersModel.from_pretrained(tmp_path / "reg").eval()
    with torch.no_grad():
        tokens = ref(pixel_values=ex.normalize(x), output_hidden_states=True).hidden_states[2]  # after layer 1
    out = ex(x)
    assert tokens.shape[1] == 1 + 4 + 16
    assert cosine(out["encoder.layer.1@cls"], tokens[:, 0]) > 0.9999
    assert cosine(out["encoder.layer.1@mean"], tokens[:, 5:].mean(1)) > 0.9999
