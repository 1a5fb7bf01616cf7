"""The ``featx`` command line: a thin click group over the library.

Each command parses its options, builds a config and calls one library function.  The
library raises :class:`featx.errors.FeatxError` for expected mistakes; the group turns it
into click's error: one sentence on stderr, exit status 1, no traceback.  Library modules
are imported inside the commands, so ``featx --help`` does not load torch.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import warnings

import click

from featx.classifiers import CLASSIFIERS
from featx.errors import FeatxError

# -- option types: every value is checked where it is parsed ---------------------------------


class FiniteFloat(click.FloatRange):
    """click's FloatRange, which lets nan and inf through, without them."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class Size(click.ParamType):
    """A positive size in bytes: 512MB, 4G, 1.5GiB or a number."""

    name = "size"

    def convert(self, value, param, ctx):
        from featx.files import parse_size

        try:
            return parse_size(value, "/".join(param.opts) if param else "size")
        except FeatxError as e:
            self.fail(str(e), param, ctx)


class Pooling(click.ParamType):
    """avg, max, gem, gridK, cls, mean or clsmean."""

    name = "pooling"

    def convert(self, value, param, ctx):
        from featx.taps import check_pool

        try:
            return check_pool(value)
        except FeatxError as e:
            self.fail(str(e), param, ctx)


SEED = click.IntRange(0, 2**32 - 1)
MAX_BATCH = 4096  # every batch is padded to the batch size: an absurd one would fill memory at once

# -- options shared by several commands (defined once) ------------------------------------

backbone_option = click.option("--backbone", "-b", default="resnet50", show_default=True,
                               help="a torchvision name, or timm:NAME, open_clip:MODEL/TAG or hf:ORG/NAME (`featx backbones "
                                    "[--source S]` lists them).")
weights_option = click.option("--weights", default="DEFAULT", show_default=True,
                              help="DEFAULT (the backbone's own), a torchvision weights name (IMAGENET1K_V1...), none "
                                   "(seeded random), or a file or folder.")
split_option = click.option("--split", default=None, help="subfolder (folder data) or split (torchvision data) to read.")
root_option = click.option("--root", default="data", show_default=True, help="where torchvision data sets live.")
image_size_option = click.option("--image-size", type=click.IntRange(8, 4096), default=None,
                                 help="resize the shorter side to S and centre-crop SxS (default: the weights' own).")
grayscale_option = click.option("--grayscale", is_flag=True, help="convert every image to gray (3 equal channels).")
batch_option = click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=None,
                            help="images per forward pass (default: 32 on CPU, 128 on CUDA).")
workers_option = click.option("--workers", type=click.IntRange(0, 256), default=None,
                              help="decoding processes (default: one per core, at most 8).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
precision_option = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                                show_default=True, help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU.")
compile_option = click.option(
    "--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
    help="run the network as a compiled graph cut after the last tap (torch.compile); auto: when there are "
    "enough images to pay for compiling (docs: README).")
seed_option = click.option("--seed", type=SEED, default=0, show_default=True,
                           help="seed of random choices (and of random weights with --weights none).")


class FeatxGroup(click.Group):
    """A click group that reports the library's FeatxError (and any OSError: a full disk, a
    read-only folder) as one sentence: click's error, exit status 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatxError as e:
            _fail(e)
        except BrokenPipeError:  # the reader left (`featx backbones | head`): stop quietly, as a pipe's writer does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a writer a pipe stopped
        except OSError as e:
            from featx.files import os_error

            _fail(os_error(e, "use"))


def _fail(e: FeatxError):
    from featx.distributed import from_env
    from featx.errors import EveryRankError

    world = from_env()
    if world.size == 1:
        raise click.ClickException(str(e)) from None
    if isinstance(e, EveryRankError):
        if world.rank:
            sys.exit(1)  # under torchrun: rank 0 prints what every rank knows
        raise click.ClickException(str(e)) from None
    raise click.ClickException(f"rank {world.rank}: {e}") from None


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"featx: warning: {message}\n"


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.group(cls=FeatxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
def main():
    """featx: transfer learning by feature extraction (torchvision -> HDF5 -> scikit-learn)."""
    warnings.formatwarning = _format_warning  # process-wide, so set here, once: one line per warning


# -- extraction ---------------------------------------------------------------------------


@main.command()
@click.argument("data")
@split_option
@root_option
@backbone_option
@weights_option
@click.option("--layer", "layers", multiple=True,
              help="tap a named module (repeatable; default: the backbone's own embedding, which `featx backbones "
                   "NAME` names).")
@click.option("--pool", "pools", type=Pooling(), multiple=True, default=("avg",), show_default=True,
              help="avg, max, gem or gridK (KxK spatial grid, K at most the tapped map's size); for a "
                   "transformer's tokens also cls, mean (patch tokens) or clsmean; repeatable.")
@image_size_option
@grayscale_option
@batch_option
@workers_option
@device_option
@precision_option
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC memory layout (faster on CUDA and on CPU).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="precision of the stored features. float16: values rounded to half precision (finite only "
                   "below 65504), stored compressed: about half the size, read at about half the speed.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: store the mean of each image's features and its mirror image's (one forward pass of "
                   "twice the images); predict does the same for a model fitted on such features.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: record undecodable images in the file and go on.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="images larger than this are refused as decompression bombs.")
@seed_option
@click.option("--unit-size", type=click.IntRange(min=1), default=None,
              help="images per work unit (default: 1/64 of the images, at most 4096; rounded up to a multiple of "
              "the batch size): what a process takes at a time and what a rerun after a kill recomputes at most.")
@click.option("--no-cache", is_flag=True, help="do not use the feature cache ($FEATX_CACHE or cache/features/).")
@compile_option
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="the .h5 file to write.")
@click.option("--overwrite", is_flag=True, help="replace an output made with other settings.")
def extract(data, split, root, backbone, weights, layers, pools, image_size, grayscale, batch_size, workers,
            device, precision, channels_last, dtype, tta, on_error, max_pixels, seed, unit_size, no_cache,
            compile_mode, out, overwrite):
    """Extract features of the images in DATA (folder, CSV/TSV list, or torchvision:NAME).

    Under torchrun every rank takes its share of the work units and rank 0 assembles the
    file: torchrun --nproc_per_node=N -m featx extract ...
    """
    from featx.decode import DEFAULT_MAX_PIXELS
    from featx.distributed import from_env
    from featx.extract import ExtractConfig, extract_data

    config = ExtractConfig(
        backbone=backbone, weights=weights, layers=tuple(layers), pools=tuple(dict.fromkeys(pools)),
        image_size=image_size, grayscale=grayscale, batch_size=batch_size, workers=workers, device=device,
        precision=precision, channels_last=channels_last, dtype=dtype, on_error=on_error,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, seed=seed, cache=None if no_cache else "auto",
        compile=compile_mode, tta=tta,
    )
    r = extract_data(data, out, config, split=split, root=root, overwrite=overwrite, unit_items=unit_size, log=_say)
    if not from_env().is_main:
        return  # under torchrun, rank 0 reports for the job
    if r.already_complete:
        click.echo(f"{out} is already complete ({r.n_rows} rows); nothing to do.")
        return
    if r.n_rows < 0:
        click.echo(f"{out}: this process extracted {r.units_done} work units; the file is assembled when every "
                   f"unit is done (`featx info {out}` shows which are missing).")
        return
    computed = r.n_items - r.resumed_from
    cached = f", {r.cache_hits} from the cache" if r.cache_hits else ""
    if computed:
        resumed = f", resumed after {r.resumed_from} items" if r.resumed_from else ""
        rate = f" ({computed / r.seconds:.1f} img/s{', compiled' if r.compiled else ''})" if r.seconds else ""
    else:
        resumed, rate = "", " (assembled from work units extracted earlier)"
    click.echo(f"wrote {out}: {r.n_rows} rows from {r.n_items} images, {len(r.failed)} failed{cached}{resumed}{rate}")
    for i, err in r.failed[:10]:
        click.echo(f"  failed: {i}: {err}", err=True)
    if len(r.failed) > 10:
        click.echo(f"  ... and {len(r.failed) - 10} more (see /failed in the file)", err=True)


@main.command()
@click.argument("name", required=False)
@click.option("--source", type=click.Choice(["torchvision", "timm", "open_clip", "hf"]), default="torchvision",
              show_default=True, help="whose models to list (timm, open_clip, hf: names only, no model built).")
@click.option("--filter", "pattern", default=None, help="only names matching this shell pattern (e.g. '*dinov2*').")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output.")
def backbones(name, source, pattern, as_json):
    """List the backbones (default tap, feature dimension, local weights), or one backbone's layers."""
    from featx import zoo

    if name and ":" in name:  # another source's model: measured now on its skeleton
        from featx import adapters

        _describe_backbone(name, adapters.summary(adapters.backbone(name)), as_json)
        return
    if source != "torchvision" and not name:
        from featx import adapters

        src = adapters.source(source)
        names = src.models(pattern)
        if as_json or names:
            click.echo(json.dumps(names, indent=1) if as_json else "\n".join(f"{source}:{n}" for n in names))
        if not names:
            _say(src.none_listed(pattern))
        return
    table = zoo.table()
    if table is None:  # made for another torchvision: measured now, on meta-device skeletons (about a minute)
        _say(f"featx's table of backbones is not for torchvision {zoo.torchvision_version()}: measuring them "
             "(scripts/make_backbone_table.py remakes the table).")
        models = _live_backbones([name] if name else None)
    else:
        models = table["models"]
    if name:
        if name not in models:
            from featx.adapters import backbone

            backbone(name)  # the sentence for an unknown name
        _describe_backbone(name, models[name], as_json)
        return
    rows = [{"name": n, "default_tap": m["default_tap"], "dim": m["dim"], "weights_local": zoo.local(m["weights"])}
            for n, m in sorted(models.items()) if not pattern or fnmatch.fnmatch(n, pattern)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'backbone':28s} {'default tap':34s} {'dim':>6s}  ImageNet weights in the torch hub cache")
    for r in rows:
        dim = str(r["dim"]) if r["dim"] else "?"
        local = ", ".join(r["weights_local"]) or "none (downloaded on first use)"
        click.echo(f"{r['name']:28s} {r['default_tap']:34s} {dim:>6s}  {local}")


def _describe_backbone(name: str, m: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"name": name, **m}, indent=1))
        return
    click.echo(f"{name}: default tap {m['default_tap']} ({m['dim'] or '?'} features)")
    click.echo("blocks (input side first; `finetune --unfreeze N` trains the last N):")
    for i, b in enumerate(m["blocks"]):
        click.echo(f"  {i:2d} {b}")
    if m["aliases"]:
        click.echo("aliases: " + ", ".join(f"{k}={v}" for k, v in m["aliases"].items()))
    click.echo("every named module can be tapped with --layer; e.g. " + ", ".join(m["modules"]))


def _live_backbones(names: list[str] | None) -> dict:
    """The table's rows measured now through the torchvision adapter (for a torchvision featx
    has no table of)."""
    from featx import adapters

    tv = adapters.source("torchvision")
    return {n: adapters.summary(tv.backbone(n)) for n in names or tv.models()}


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["parquet", "npz", "csv"]), required=True,
              help="parquet (pandas, polars, DuckDB), npz (numpy) or csv (small files only).")
@click.option("--tap", default=None, help="the tap to export (default: the file's default tap).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="the file to write (default: PATH with the format's suffix).")
@click.option("--columns", is_flag=True, help="parquet: one column per feature (f0, f1...) instead of one list column.")
def export(path, to, tap, out, columns):
    """Write a feature file's rows (id, label, class, features of one tap) as parquet, npz or csv."""
    from featx.export import export_file

    written = export_file(path, to, tap, out, columns)
    _say(f"wrote {written}")


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
        how = (f"rerun to finish: {d['command']}" if d.get("command") else
               "rerun the command that made it to finish it")
        if d.get("world_size"):
            how += f" (it ran as {d['world_size']} processes under torchrun; any number of processes can finish it)"
        click.echo(f"{path}: INCOMPLETE ({d['progress']}); {how}")
        sys.exit(2)
    click.echo(f"{path}: complete, {d['format']}")
    click.echo(f"  rows {d['rows']}, failed {d['failed']}, classes {len(d['classes'])}: {', '.join(d['classes'][:10])}")
    seed = f", seed {d['weights_seed']}" if d.get("weights_seed") is not None else ""
    click.echo(f"  backbone {d['backbone']}, weights {d['weights']} (sha256 {str(d['weights_sha256'])[:12]}{seed})")
    click.echo("  taps: " + ", ".join(f"{t} ({dim})" for t, dim in d["taps"].items()) + f"; default {d['default_tap']}")
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
    from featx.weights import import_weights

    dest = import_weights(path)
    click.echo(f"imported {path} -> {dest}")



@main.group()
def cache():
    """The feature cache ($FEATX_CACHE, or cache/features/ under the working directory)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True)
def cache_info(as_json):
    """Entries, size, and per setting its entries and hit rate."""
    c = _existing_cache()
    if c is None:
        return
    d = c.info()
    c.close()
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{d['path']}: {d['entries']} vectors, {d['bytes_on_disk'] / 2**20:.1f} MB on disk")
    for s in d["settings"]:
        rate = f"{100 * s['hit_rate']:.0f} %" if s["hit_rate"] is not None else "-"
        click.echo(f"  {s['setting'][:12]}  {s['entries']:8d} vectors  hits {s['hits']}, misses {s['misses']} "
                   f"({rate})  {s['backbone']} {s['layer']}@{s['pool']} weights {s['weights_sha256'][:12]} "
                   f"{s['dtype']} {s['precision']} {s['device']}")


@cache.command("prune")
@click.option("--max-size", required=True, type=Size(), help="evict the least recently used vectors until the "
              "cache holds at most this much, e.g. 20G or 500MB (to empty it, remove its folder).")
def cache_prune(max_size):
    """Evict the least recently used vectors."""
    c = _existing_cache()
    if c is None:
        return
    before = c.size()
    try:
        removed, compacted = c.prune(max_size)
        after = c.size()
    finally:
        c.close()
    note = "" if compacted else (" (the file was not compacted: the disk lacks the room that needs; the cache reuses "
                                 "the freed space)")
    click.echo(f"{c.root}: removed {removed} vectors, {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB{note}")


def _existing_cache():
    """The feature cache, None (after saying so) when there is none yet: reading never makes one."""
    from featx.cache import FeatureCache, default_location

    root = default_location()
    if not (root / "index.sqlite").is_file():
        click.echo(f"there is no feature cache at {root} yet (the first `featx extract` makes it).")
        return None
    c = FeatureCache.open(root, create=False, log=_say)
    if c is None:
        raise FeatxError(f"the feature cache at {root} cannot be read (the warning above says why).")
    return c


# -- classifiers --------------------------------------------------------------------------


@main.command()
@click.argument("features", type=click.Path())
@click.option("--clf", type=click.Choice(list(CLASSIFIERS)), default="logreg", show_default=True)
@click.option("--tap", multiple=True, help="stored tap to fit on (default: the file's default tap); repeat it to "
              "combine taps side by side (each standardised on its own; predict extracts them all in one pass).")
@click.option("--val", "val_path", type=click.Path(), default=None, help="a validation feature file for selection.")
@click.option("--val-fraction", type=FiniteFloat(0.01, 0.9), default=0.2, show_default=True,
              help="held-out share of the training rows when --val is not given.")
@click.option("--search", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: the classifier's default grid; none: default hyper-parameters.")
@click.option("--grid", default=None, help="your own grid, e.g. 'C=0.01,0.1,1' (overrides --search).")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--memory-budget", type=Size(), default=None, help="stores larger than this are fitted out of core "
              "(default: a quarter of RAM).")
@click.option("--drop-nonfinite", is_flag=True, help="leave out rows whose features hold nan or inf (saying how "
              "many) instead of refusing the file.")
@click.option("--knn-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="--clf knn keeps its training rows in the model: float16 halves the bundle and its memory.")
@seed_option
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="model bundle to write (.skops).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="directory for metrics.json and confusion_matrix.png (default: <out>-report/).")
@click.option("--pickle", "use_pickle", is_flag=True, help="save with joblib/pickle instead of skops (unsafe to share).")
def fit(features, clf, tap, val_path, val_fraction, search, grid, class_weight, memory_budget, drop_nonfinite,
        knn_dtype, seed, out, report_dir, use_pickle):
    """Train a classifier on FEATURES, select its hyper-parameters, save a model bundle."""
    from featx.classifiers import parse_grid
    from featx.fit import fit_file
    from featx.metrics import format_table

    spec = parse_grid(grid) if grid else search
    result = fit_file(features, out, clf, tap, val_path, val_fraction, spec, None if class_weight == "none" else
                      class_weight, memory_budget, seed, report_dir, use_pickle, drop_nonfinite, log=click.echo,
                      knn_dtype=knn_dtype)
    for row in result.search:
        click.echo(f"  {json.dumps(row['params'])}: val accuracy {row['val_accuracy']:.4f} ({row['seconds']:.1f}s)")
    if result.params:
        click.echo(f"selected {json.dumps(result.params)}")
    if result.convergence:
        c = result.convergence
        how = c.get("rule") or ("converged" if c["converged"] else "stopped at its epoch limit, not converged")
        click.echo(f"final fit: {c['epochs']} epochs, {how} (objective {c['objective']:.4f})")
    if result.report_dir:
        click.echo("validation:\n" + format_table(result.val_metrics))
        click.echo(f"report: {result.report_dir}/metrics.json, {result.report_dir}/confusion_matrix.png")
    click.echo(f"saved {out} ({clf} on {result.tap}, {result.fit_seconds:.1f}s)")


@main.command()
@click.argument("model", type=click.Path())
@click.argument("features", type=click.Path())
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="directory for metrics.json and confusion_matrix.png.")
@click.option("--allow-pickle", is_flag=True, help="accept a joblib/pickle bundle (runs code from the file).")
def evaluate(model, features, report_dir, allow_pickle):
    """Score MODEL on a labelled feature file; print and save the metrics."""
    from featx.fit import evaluate_file
    from featx.metrics import format_table

    _, m = evaluate_file(model, features, report_dir, allow_pickle)
    click.echo(f"{model} on {features} ({m['n']} rows):\n" + format_table(m))
    if report_dir:
        click.echo(f"report: {report_dir}/metrics.json, {report_dir}/confusion_matrix.png")


@main.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="predictions.csv", show_default=True)
@click.option("--sheet", type=click.Path(dir_okay=False), default=None, help="also draw a contact sheet PNG.")
@click.option("--weights", default=None, help="the backbone weights (a file or folder), if they moved since the features were made.")
@batch_option
@workers_option
@device_option
@compile_option
@click.option("--allow-pickle", is_flag=True, help="accept a joblib/pickle bundle (runs code from the file).")
def predict(model, inputs, out, sheet, weights, batch_size, workers, device, compile_mode, allow_pickle):
    """Classify images (a folder, a CSV list, or image files) with MODEL."""
    from featx.predict import predict_files

    res = predict_files(model, list(inputs), out, sheet, weights=weights, batch_size=batch_size, workers=workers,
                        device=device, allow_pickle=allow_pickle, compile=compile_mode, log=_say)
    n_ok = sum(1 for r in res.rows if r["error"] is None)
    click.echo(f"wrote {out}: {n_ok} images classified, {len(res.rows) - n_ok} failed")
    for r in res.rows:
        if r["error"] is not None:
            click.echo(f"  failed: {r['id']}: {r['error']}", err=True)
    if sheet:
        click.echo(f"contact sheet: {sheet}")


# -- sweep --------------------------------------------------------------------------------


@main.command()
@click.argument("data", required=False)
@click.option("--train", "train_path", type=click.Path(), default=None, help="probe the taps of this feature file.")
@click.option("--val", "val_path", type=click.Path(), default=None, help="validation feature file (with --train).")
@backbone_option
@weights_option
@click.option("--taps", "taps", multiple=True, default=("blocks",), show_default=True,
              help="'blocks' (every block of the backbone) or layer names; repeatable.")
@click.option("--pool", "pools", type=Pooling(), multiple=True, default=("avg",), show_default=True,
              help="repeatable.")
@click.option("--train-split", default=None, help="training split (default: train/ if DATA has one, else all of DATA).")
@click.option("--val-split", default=None, help="validation split (default: val/ if DATA has one, else a hold-out).")
@click.option("--val-fraction", type=FiniteFloat(0.01, 0.9), default=0.2, show_default=True,
              help="stratified, seeded share of the training images held out when there is no validation split.")
@click.option("--max-per-class", type=click.IntRange(min=1), default=None, help="subsample for a quick survey.")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="from images: extract the best tap and combination again with --tta flip and probe them.")
@root_option
@image_size_option
@batch_option
@workers_option
@device_option
@compile_option
@seed_option
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="output directory.")
def sweep(data, train_path, val_path, backbone, weights, taps, pools, train_split, val_split, val_fraction,
          max_per_class, flip, root, image_size, batch_size, workers, device, compile_mode, seed, out):
    """Probe every tap x pooling with a linear classifier and kNN, then the best taps combined
    and flip-averaged; tables, plot and advice in OUT."""
    from featx import sweep as sw

    def show(row):
        if isinstance(row, sw.ProbeRow):
            click.echo(f"  {row.tap:28s} dim {row.dim:6d}  val acc {row.val_accuracy:.4f}  knn "
                       f"{row.knn_accuracy:.4f}  ({row.fit_seconds:.1f}s)")
        else:
            flipped = " (flip)" if row.tta == "flip" else ""
            click.echo(f"  {row.taps + flipped:28s} dim {row.dim:6d}  val acc {row.val_accuracy:.4f}  knn "
                       f"{row.knn_accuracy:.4f}  ({row.fit_seconds:.1f}s)")

    if (data is None) == (train_path is None):
        raise FeatxError("give either DATA (images) or --train FEATURES.h5, not both or neither.")
    if data is not None:
        _, advice = sw.sweep_images(data, out, backbone, weights, list(taps), list(pools), train_split,
                                    val_split, max_per_class, image_size, root, seed,
                                    {"batch_size": batch_size, "workers": workers, "device": device,
                                     "compile": compile_mode},
                                    progress=show, val_fraction=val_fraction, log=_say, flip=flip)
    else:
        _, advice = sw.sweep_files(train_path, val_path, out, list(taps), max_per_class, val_fraction, seed,
                                   progress=show)
    click.echo("\n".join(advice))
    click.echo(f"tables: {out}/sweep.csv, {out}/combined.csv; plot: {out}/accuracy_by_depth.png")


# -- fine-tuning --------------------------------------------------------------------------


@main.command()
@click.argument("data")
@click.option("--split", default=None, help="training split (default: train/ if DATA has one, else all of DATA).")
@click.option("--val-split", default=None, help="validation split (default: val/ if DATA has one, else a hold-out).")
@click.option("--val-fraction", type=FiniteFloat(0, 0.9), default=0.2, show_default=True,
              help="stratified, seeded share of the training images held out for validation when there is no "
              "validation split (it picks the exported epoch); 0: none, the last epoch is exported.")
@root_option
@backbone_option
@weights_option
@click.option("--unfreeze", default="0", show_default=True, help="0 (head only), N (last N blocks) or all.")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="head-only epochs before the blocks are unfrozen.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
              help="head learning rate.")
@click.option("--backbone-lr-mult", type=FiniteFloat(0, 1, min_open=True), default=0.1, show_default=True,
              help="backbone lr = lr x this, in (0, 1].")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--label-smoothing", type=FiniteFloat(0, 0.5), default=0.0, show_default=True)
@click.option("--augment", type=click.Choice(["default", "light", "none"]), default="default", show_default=True,
              help="default: crop, flip, shear/zoom, colour; light: flip + shear/zoom; none.")
@image_size_option
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True)
@workers_option
@device_option
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="train through a compiled graph (torch.compile); auto: when the run trains "
              "on enough images (training images x epochs) to pay for compiling (docs: README).")
@click.option("--recipe", type=click.Choice(["fast"]), default=None,
              help="fast: --schedule onecycle --tta flip (what of fast-training recipes helped; measured in "
              "BENCHMARKS.md); an option given with it wins.")
@click.option("--schedule", type=click.Choice(["cosine", "onecycle"]), default=None,
              help="learning rate: cosine over all steps (default), or onecycle (a rise over the first quarter).")
@click.option("--ema", type=FiniteFloat(0, 0.999999), default=None,
              help="decay of a moving average of the weights, validated and exported instead (default 0: off).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default=None,
              help="flip: validate (and predict) on each image's and its mirror's mean logits (default none).")
@click.option("--progressive", type=click.IntRange(min=1), default=None, metavar="PX",
              help="progressive resizing: train the first epoch at PX pixels, growing in 8-pixel steps to the image "
              "size by the last epoch; validation and export use the image size (default: the image size throughout).")
@seed_option
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="run directory.")
def finetune(data, split, val_split, val_fraction, root, backbone, weights, unfreeze, head, epochs, warmup_epochs, lr,
             backbone_lr_mult, optimizer, label_smoothing, augment, image_size, batch_size, workers, device,
             compile_mode, recipe, schedule, ema, tta, progressive, seed, resume, out):
    """Fine-tune BACKBONE on DATA: a new head, plus the last N blocks (or all)."""
    from featx.finetune import RECIPES, FinetuneConfig, finetune_data

    given = {k: v for k, v in (("schedule", schedule), ("ema", ema), ("tta", tta), ("progressive", progressive))
             if v is not None}
    config = FinetuneConfig(backbone=backbone, weights=weights, unfreeze=unfreeze, head=head, epochs=epochs,
                            warmup_epochs=warmup_epochs, lr=lr, backbone_lr_mult=backbone_lr_mult,
                            optimizer=optimizer, label_smoothing=label_smoothing, augment=augment,
                            image_size=image_size, batch_size=batch_size, workers=workers, device=device, seed=seed,
                            compile=compile_mode, **{**RECIPES.get(recipe, {}), **given})
    r = finetune_data(data, out, config, split, val_split, root, val_fraction, resume, log=click.echo, say=_say)
    click.echo(f"weights: {r['weights']} (+ backbone.json); metrics: {out}/metrics.csv, {out}/training_curves.png")


if __name__ == "__main__":  # pragma: no cover
    main()
