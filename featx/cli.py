"""The ``featx`` command line: a thin click group over the library.

Each command parses its options, builds a config and calls one library function.
Expected mistakes raise :class:`featx.errors.FeatxError`, printed as one sentence with
exit status 1.
"""

from __future__ import annotations

import json
import sys

import click

from featx.errors import FeatxError

# -- options shared by several commands (defined once) ------------------------------------

backbone_option = click.option("--backbone", "-b", default="resnet50", show_default=True,
                               help="torchvision model name (`featx backbones` lists them).")
weights_option = click.option("--weights", default="DEFAULT", show_default=True,
                              help="DEFAULT, a weights name (IMAGENET1K_V1...), none (random), or a file.")
split_option = click.option("--split", default=None, help="subfolder (folder data) or split (torchvision data) to read.")
root_option = click.option("--root", default="data", show_default=True, help="where torchvision data sets live.")
image_size_option = click.option("--image-size", type=click.IntRange(min=8), default=None,
                                 help="resize the shorter side to S and centre-crop SxS (default: the weights' own).")
grayscale_option = click.option("--grayscale", is_flag=True, help="convert every image to gray (3 equal channels).")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
workers_option = click.option("--workers", type=click.IntRange(min=0), default=None,
                              help="decoding processes (default: one per core, at most 8).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
precision_option = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                                show_default=True, help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU.")
seed_option = click.option("--seed", type=int, default=0, show_default=True)


def _fail(msg: str):
    raise FeatxError(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
def main():
    """featx: transfer learning by feature extraction (torchvision -> HDF5 -> scikit-learn)."""


# -- extraction ---------------------------------------------------------------------------


@main.command()
@click.argument("data")
@split_option
@root_option
@backbone_option
@weights_option
@click.option("--layer", "layers", multiple=True, help="tap a named module (repeatable; default: the backbone's pooled output).")
@click.option("--pool", "pools", multiple=True, default=("avg",), show_default=True,
              help="avg, max, gem or gridK (KxK spatial grid); repeatable.")
@image_size_option
@grayscale_option
@batch_option
@workers_option
@device_option
@precision_option
@click.option("--channels-last/--no-channels-last", default=None, help="default: on for CUDA.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: record undecodable images in the file and go on.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="images larger than this are refused as decompression bombs.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="the .h5 file to write.")
@click.option("--overwrite", is_flag=True, help="replace an output made with other settings.")
def extract(data, split, root, backbone, weights, layers, pools, image_size, grayscale, batch_size, workers,
            device, precision, channels_last, dtype, on_error, max_pixels, out, overwrite):
    """Extract features of the images in DATA (folder, CSV/TSV list, or torchvision:NAME)."""
    from featx.extract import ExtractConfig
    from featx.extract import extract as run
    from featx.sources import DEFAULT_MAX_PIXELS, open_source

    source = open_source(data, split=split, root=root)
    config = ExtractConfig(
        backbone=backbone, weights=weights, layers=tuple(layers), pools=tuple(dict.fromkeys(pools)),
        image_size=image_size, grayscale=grayscale, batch_size=batch_size, workers=workers, device=device,
        precision=precision, channels_last=channels_last, dtype=dtype, on_error=on_error,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
    )
    r = run(source, out, config, overwrite=overwrite)
    if r.already_complete:
        click.echo(f"{out} is already complete ({r.n_rows} rows); nothing to do.")
        return
    resumed = f", resumed after {r.resumed_from} items" if r.resumed_from else ""
    rate = (r.n_items - r.resumed_from) / r.seconds if r.seconds else 0
    click.echo(f"wrote {out}: {r.n_rows} rows from {r.n_items} images, {len(r.failed)} failed"
               f"{resumed} ({rate:.1f} img/s)")
    for i, err in r.failed[:10]:
        click.echo(f"  failed: {i}: {err}", err=True)
    if len(r.failed) > 10:
        click.echo(f"  ... and {len(r.failed) - 10} more (see /failed in the file)", err=True)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output.")
def backbones(name, as_json):
    """List the backbones (default tap, feature dimension, local weights), or one backbone's layers."""
    from featx import backbones as bb

    if name:
        bb.check_backbone(name)
        model = bb._build(name, None)
        blocks = bb.blocks_of(name, model)
        fam = bb.family_of(name)
        click.echo(f"{name}: default tap {bb.default_tap(name, model)}")
        click.echo("blocks (input side first; `finetune --unfreeze N` trains the last N):")
        for i, b in enumerate(blocks):
            click.echo(f"  {i:2d} {b.tap}")
        if fam.aliases:
            click.echo("aliases: " + ", ".join(f"{k}={v}" for k, v in fam.aliases.items()))
        click.echo("every named module can be tapped with --layer; e.g. " +
                   ", ".join(n for n, _ in list(model.named_modules())[1:6]))
        return
    rows = [bb.describe(n) for n in bb.available_backbones()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'backbone':28s} {'default tap':34s} {'dim':>6s}  weights")
    for r in rows:
        dim = str(r["dim"]) if r["dim"] else "?"
        click.echo(f"{r['name']:28s} {r['default_tap']:34s} {dim:>6s}  {'local' if r['weights_local'] else 'download'}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def info(path, as_json):
    """Describe a feature file (or the progress of an unfinished extraction)."""
    from featx.store import info as store_info

    d = store_info(path)
    if as_json:
        click.echo(json.dumps(d, indent=1, default=str))
        return
    if not d["complete"]:
        click.echo(f"{path}: INCOMPLETE ({d['progress']}); rerun to finish: {d.get('command')}")
        sys.exit(2)
    click.echo(f"{path}: complete, {d['format']}")
    click.echo(f"  rows {d['rows']}, failed {d['failed']}, classes {len(d['classes'])}: {', '.join(d['classes'][:10])}")
    click.echo(f"  backbone {d['backbone']}, weights {d['weights']} (sha256 {str(d['weights_sha256'])[:12]})")
    click.echo(f"  taps: " + ", ".join(f"{t} ({dim})" for t, dim in d["taps"].items()) + f"; default {d['default_tap']}")
    click.echo(f"  preprocessing {d['preprocessing']}")
    click.echo(f"  source {d['source']}")
    click.echo(f"  made by featx {d['featx_version']}, torch {d['torch_version']}, torchvision "
               f"{d['torchvision_version']}: {d['command']}")


@main.group()
def weights():
    """Manage backbone weights in the torch hub cache."""


@weights.command("import")
@click.argument("path", type=click.Path())
def weights_import(path):
    """Verify a torchvision weights file and copy it to the torch hub cache (for offline use)."""
    from featx.backbones import import_weights

    dest = import_weights(path)
    click.echo(f"imported {path} -> {dest}")


if __name__ == "__main__":  # pragma: no cover
    main()
