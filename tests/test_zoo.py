"""`featx backbones` from featx's table of torchvision's models (issue 19, item 5): no torch,
no model built; the table agrees with the registry and the meta-device skeletons."""

from __future__ import annotations

import subprocess
import sys

import pytest

from featx import registry, zoo

SAMPLE = ["mobilenet_v2", "resnet50", "vgg16", "vit_b_16", "swin_t", "regnet_y_400mf", "densenet121", "inception_v3",
          "googlenet", "shufflenet_v2_x0_5"]


def test_the_table_lists_every_model_of_the_installed_torchvision():
    table = zoo.table()
    assert table is not None, "featx/data/backbones.json is for another torchvision: run scripts/make_backbone_table.py"
    assert sorted(table["models"]) == registry.available_backbones()


@pytest.mark.parametrize("name", SAMPLE)
def test_the_table_agrees_with_the_skeletons(name):
    from featx.cli import _live_backbones

    assert zoo.table()["models"][name] == _live_backbones([name])[name]


def test_listing_imports_no_torch():
    code = ("import sys; from click.testing import CliRunner; from featx.cli import main; "
            "r = CliRunner().invoke(main, ['backbones']); r2 = CliRunner().invoke(main, ['backbones', 'vgg16']); "
            "print(r.exit_code, r2.exit_code, len(r.output.splitlines()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["0", "0"] and int(out[2]) > 80 and out[3] == "False"


def test_another_torchvision_is_measured_live(run_cli, monkeypatch):
    monkeypatch.setattr(zoo, "torchvision_version", lambda: "0.0.1")
    r = run_cli("backbones", "vgg16")
    assert r.exit_code == 0 and "is not for torchvision 0.0.1: measuring" in r.stderr
    assert "default tap features (512 features)" in r.stdout and "fc7=classifier.4" in r.stdout
