import csv

from conftest import BACKBONE


def _extract(run_cli, image_tree, split, weights, out):
    r = run_cli("extract", image_tree, "--split", split, "-b", BACKBONE, "--weights", weights, "--image-size", "32",
                "--layer", "features.10", "--pool", "grid2", "--out", out)
    assert r.exit_code == 0, r.output


def test_predict_folder_list_and_files_with_a_bad_image(image_tree, tmp_path, run_cli, weights_file):
    _extract(run_cli, image_tree, "train", weights_file, tmp_path / "train.h5")
    r = run_cli("fit", tmp_path / "train.h5", "--clf", "logreg", "--search", "none", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    new = tmp_path / "new"
    new.mkdir()
    for name in ("0.jpg", "1.jpg"):
        (new / f"red_{name}").write_bytes((image_tree / "val" / "red" / name).read_bytes())
        (new / f"blue_{name}").write_bytes((image_tree / "val" / "blue" / name).read_bytes())
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run_cli("predict", tmp_path / "m.skops", new, "--out", tmp_path / "p.csv", "--sheet", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert "4 images classified, 1 failed" in r.stdout and "broken.jpg" in r.stderr
    rows = {row["id"]: row for row in csv.DictReader(open(tmp_path / "p.csv"))}
    assert rows["broken.jpg"]["predicted"] == "" and rows["broken.jpg"]["error"]
    for k in ("red_0.jpg", "red_1.jpg", "blue_0.jpg", "blue_1.jpg"):
        assert rows[k]["predicted"] == k.split("_")[0]  # colour classes are easy
        assert abs(float(rows[k]["p_red"]) + float(rows[k]["p_blue"]) - 1) < 1e-5
    assert (tmp_path / "s.png").stat().st_size > 5000
    # single files: a bad one among them is a recorded failure ...
    r = run_cli("predict", tmp_path / "m.skops", new / "red_0.jpg", new / "broken.jpg", "--out", tmp_path / "q.csv")
    assert r.exit_code == 0 and "1 images classified, 1 failed" in r.stdout
    # ... but a path that does not exist is the user's mistake: one sentence, no output
    for args in ([new / "red_0.jpg", new / "gone.jpg"], [tmp_path / "no" / "such" / "folder"]):
        r = run_cli("predict", tmp_path / "m.skops", *args, "--out", tmp_path / "gone.csv")
        assert r.exit_code == 1 and "does not exist" in r.stderr and "Traceback" not in r.output
        assert not (tmp_path / "gone.csv").exists()


def test_predict_checks_the_weights_it_is_given(image_tree, tmp_path, run_cli, weights_file):
    _extract(run_cli, image_tree, "train", weights_file, tmp_path / "train.h5")
    assert run_cli("fit", tmp_path / "train.h5", "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    import torch
    import torchvision

    other = tmp_path / "other.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), other)
    r = run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--weights", other, "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and "are not the ones the model was trained with" in r.stderr


def test_predict_remakes_seeded_random_weights(image_tree, tmp_path, run_cli):
    """Random weights are seeded: predict makes the same network again and checks its digest."""
    _extract(run_cli, image_tree, "train", "none", tmp_path / "train.h5")
    assert run_cli("fit", tmp_path / "train.h5", "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    r = run_cli("predict", tmp_path / "m.skops", image_tree / "val", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0 and "6 images classified, 0 failed" in r.stdout
    # a bundle from before seeding (no seed recorded) is refused in one sentence
    from featx import bundle

    b = bundle.load(tmp_path / "m.skops")
    bundle.save(tmp_path / "old.skops", b.pipeline, {**b.meta, "weights_seed": None, "weights_sha256": ""})
    r = run_cli("predict", tmp_path / "old.skops", image_tree / "val", "--out", tmp_path / "q.csv")
    assert r.exit_code == 1 and "unseeded random backbone" in r.stderr
