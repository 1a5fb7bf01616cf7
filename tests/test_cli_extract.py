from featx.store import FeatureStore


def test_extract_info_and_summary(image_tree, tmp_path, run_cli):
    (image_tree / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "f.h5"
    r = run_cli("extract", image_tree, "--split", "train", "--backbone", "mobilenet_v2", "--weights", "none",
                "--image-size", "32", "--layer", "features.6", "--pool", "avg", "--pool", "gem", "--out", out)
    assert r.exit_code == 0, r.output
    assert "12 rows from 13 images, 1 failed" in r.stdout
    assert "broken.jpg" in r.stderr
    with FeatureStore(out) as fs:
        assert fs.taps == ["features.6@avg", "features.6@gem"]
    info = run_cli("info", out)
    assert info.exit_code == 0 and "complete" in info.stdout and "features.6@gem (32)" in info.stdout


def test_rerun_complete_is_a_no_op(image_tree, tmp_path, run_cli, weights_file):
    args = ["extract", image_tree, "--split", "val", "-b", "mobilenet_v2", "--weights", weights_file,
            "--image-size", "32", "--out", tmp_path / "f.h5"]
    assert run_cli(*args).exit_code == 0
    again = run_cli(*args)
    assert again.exit_code == 0 and "already complete" in again.stdout
    other = run_cli(*args[:-2], "--pool", "max", "--out", tmp_path / "f.h5")
    assert other.exit_code == 1 and "--overwrite" in other.stderr and "Traceback" not in other.output


def test_user_errors_are_one_sentence(tmp_path, run_cli):
    r = run_cli("extract", tmp_path / "missing", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and r.stderr.startswith("Error: data folder") and "Traceback" not in r.output
    r = run_cli("extract", tmp_path, "--backbone", "resnet51", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "unknown backbone 'resnet51'" in r.stderr
    r = run_cli("info", tmp_path / "nothing.h5")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = run_cli("backbones", "resnet51")
    assert r.exit_code == 1 and "unknown backbone 'resnet51'" in r.stderr and "Traceback" not in r.output


def test_backbones_lists_and_describes(run_cli):
    r = run_cli("backbones", "vgg16")
    assert r.exit_code == 0
    assert "default tap features" in r.stdout and "features.30" in r.stdout and "fc7=classifier.4" in r.stdout


def test_backbones_listing_covers_the_zoo(tmp_path, monkeypatch, run_cli):
    import json

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "mobilenet_v2-b0353104.pth").write_bytes(b"")  # what `featx weights import` leaves there
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    r = run_cli("backbones", "--json")
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert len(rows) > 50
    dims = {n: rows[n]["dim"] for n in ("alexnet", "vgg16", "resnet50", "inception_v3", "mobilenet_v2")}
    assert dims == {"alexnet": 256, "vgg16": 512, "resnet50": 2048, "inception_v3": 2048, "mobilenet_v2": 1280}
    assert rows["mobilenet_v2"]["weights_local"] == ["IMAGENET1K_V1"] and rows["resnet50"]["weights_local"] == []
    assert rows["vit_b_16"]["default_tap"] == "heads.head:input" and rows["vit_b_16"]["dim"] == 768


def test_bad_option_values_are_one_sentence(image_tree, tmp_path, run_cli):
    base = ["extract", image_tree, "--split", "val", "-b", "mobilenet_v2", "--weights", "none", "--out", tmp_path / "f.h5"]
    r = run_cli(*base, "--device", "gpu7")
    assert r.exit_code == 1 and "--device 'gpu7' is not a device" in r.stderr
    r = run_cli(*base, "--pool", "median")  # checked where it is parsed: click's usage error
    assert r.exit_code == 2 and "unknown pooling 'median'" in r.stderr
    r = run_cli(*base, "--weights", "IMAGENET9K")
    assert r.exit_code == 1 and "neither a file nor a weights name" in r.stderr
    r = run_cli("sweep", image_tree, "--train", tmp_path / "f.h5", "--out", tmp_path / "sw")
    assert r.exit_code == 1 and "either DATA (images) or --train" in r.stderr
    r = run_cli("fit", tmp_path / "missing.h5", "--memory-budget", "lots", "--out", tmp_path / "m.skops")
    assert r.exit_code == 2 and "--memory-budget 'lots' is not a size" in r.stderr
    r = run_cli("predict", tmp_path / "nope.skops", image_tree, "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_a_reader_that_leaves_stops_the_listing_quietly():
    """`featx backbones | head -1`: the pipe closes under the writer, which stops without a word."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        p = subprocess.run([sys.executable, "-m", "featx", "backbones"], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write)
    assert p.returncode == 141 and p.stderr == ""
