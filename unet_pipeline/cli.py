"""`unet-pipeline <stage>` (or `python -m unet_pipeline <stage>`): one subcommand per workflow stage.

Snakemake rules call these (with arguments from `stages`), and each also
runs on its own. A block-wise stage (preprocess, predict, segment) given
`--part i/N` does only that job's share and writes a summary for the
workflow; without `--part` it does all of it and publishes the store, as a
user running one command expects. Option defaults and choice lists are the
config schema's. Errors meant for users (bad input, bad config, a file that
cannot be read or written) are printed as one sentence that names the file
or key, without a traceback, and the command exits with status 2. Library
code reports through `logging`; the CLI sends it to stderr, one message per
line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from unet_pipeline import schema
from unet_pipeline.errors import ConfigError, PipelineError
from unet_pipeline.threads import prefer_sleeping_openmp_threads

log = logging.getLogger("unet_pipeline")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the one sentence every subcommand promises: no usage block, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


# --------------------------------------------------------------------------- argument types
def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _zyx(text: str) -> tuple[int, int, int]:
    """Three positive integers Z,Y,X (a chunk shape, chunks per file)."""
    values = _ints(text)
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers Z,Y,X, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _voxel_size(text: str):
    """`auto`, or three positive numbers Z,Y,X in nm."""
    if text == "auto":
        return "auto"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected auto or three positive numbers Z,Y,X in nm, got {text!r}")
    return values


def _levels(text: str):
    """`auto`, or a number of pyramid levels (0 or more)."""
    if text == "auto":
        return "auto"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or a number of levels, got {text!r}")
    return int(text)


def _auto_or(kind):
    """`auto`, or a value of `kind`."""
    def parse(text: str):
        if text == "auto":
            return "auto"
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or a {kind.__name__}, got {text!r}") from None
    return parse


def _part(text: str):
    from unet_pipeline.geometry import Part

    try:
        return Part.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json(text: str | None, option: str, default=None):
    """A JSON option's value, or ConfigError naming the option."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}") from None


def _tta(value: str):
    return int(value) if value.isdigit() else value


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise PipelineError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return int(value)


def _use_threads(threads: int) -> None:
    """This job's threads for zarr's codecs (the torch stages set torch's too)."""
    from unet_pipeline.stores import use_fast_codecs

    use_fast_codecs(threads)


def _report(summary, what: str) -> None:
    print(f"{what}: {summary.blocks_computed} blocks computed, {summary.blocks_skipped} already done "
          f"({summary.seconds:.1f} s)")


def _after_part(a, summary, what: str) -> None:
    """Write the part's summary; without --part (the whole stage ran here) also publish the store."""
    from unet_pipeline.blockwise import PartialStore
    from unet_pipeline.finish import finish_store

    summary.write(a.summary)
    if a.part is None:
        finish_store(PartialStore(Path(a.out), summary.signature), 1, a.threads)
        print(f"wrote {a.out}")
    else:
        _report(summary, f"{what} part {a.part}")


# --------------------------------------------------------------------------- stages
def cmd_synth(a):
    """`unet-pipeline synth`: generate a synthetic EM-like stack and its exact labels as TIFFs."""
    import tifffile

    from unet_pipeline.atomic import atomic_file
    from unet_pipeline.synthetic import synthesize_labels_and_raw

    raw, labels = synthesize_labels_and_raw(a.slices, a.shape, a.seed, a.cell_diameter_px)
    for path, data in ((a.out_raw, raw), (a.out_labels, labels)):
        with atomic_file(path) as tmp:
            tifffile.imwrite(tmp, data, photometric="minisblack")
    print(f"wrote {a.out_raw} and {a.out_labels}: {raw.shape}")


def cmd_preprocess(a):
    """`unet-pipeline preprocess`: a raw or label stack into its OME-Zarr store (one part, or all and the finished store)."""
    from unet_pipeline.geometry import Part
    from unet_pipeline.preprocess import labels_part, raw_part

    _use_threads(a.threads)
    part = a.part or Part(0, 1)
    common = dict(chunks=a.chunks, chunks_per_file=a.chunks_per_file, voxel_size_nm=a.voxel_size,
                  pyramid_levels=a.pyramid_levels, threads=a.threads, where=a.voxel_size_key)
    if a.labels is not None:
        summary = labels_part(a.labels, a.raw, a.out, part, label_format=a.label_format, **common)
    else:
        summary = raw_part(a.raw, a.out, part, **common)
    _after_part(a, summary, "preprocess")


def cmd_weights(a):
    """`unet-pipeline weights`: the paper's weight maps of a label store."""
    from unet_pipeline.weights import write_weights

    _use_threads(a.threads)
    write_weights(a.labels, a.out, w0=a.w0, sigma_px=a.sigma_px, label_format=a.label_format,
                  pyramid_levels=a.pyramid_levels, threads=a.threads)
    print(f"wrote {a.out}")


def _datasets(text: str, keys: set[str], use: str) -> list[dict]:
    """--datasets: a JSON list of objects with at least `keys` (ConfigError naming the option otherwise)."""
    datasets = _json(text, "--datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) and keys <= set(d) for d in datasets):
        raise ConfigError(f"--datasets must be a JSON list of objects with {', '.join(sorted(keys))} ({use})")
    return datasets


def _slices_of(ds: dict, key: str) -> list[int]:
    """The dataset's `key` slices (train, validate) as indices of its raw store."""
    from unet_pipeline.config import parse_slices
    from unet_pipeline.stores import open_image

    return parse_slices(ds.get(key), open_image(ds["raw"]).shape[0], f"datasets.{ds['name']}.{key}")


def cmd_train(a):
    """`unet-pipeline train`: train the U-Net on the datasets' training slices, validating on their validation slices."""
    import torch

    from unet_pipeline.model import UNetConfig
    from unet_pipeline.train import SliceSet, TrainConfig, load_slices, train, train_data_parallel

    _use_threads(a.threads)
    torch.set_num_threads(a.threads)
    model_cfg = UNetConfig(**_json(a.model, "--model"))
    train_values = _json(a.train, "--train")
    gpus = int(train_values.pop("gpus", 1))
    cfg = TrainConfig.from_dict(train_values)
    train_parts, val_parts = [], []
    for ds in _datasets(a.datasets, {"name", "raw", "labels", "weights"}, "and train, validate"):
        tr, va = _slices_of(ds, "train"), _slices_of(ds, "validate")
        if tr:
            train_parts.append(load_slices(ds["raw"], ds["labels"], ds["weights"], tr))
        if va:
            val_parts.append(load_slices(ds["raw"], ds["labels"], ds["weights"], va))
    if not train_parts:
        raise PipelineError("no training slices: set datasets.<name>.train for a dataset with labels")
    kwargs = dict(model_cfg=model_cfg, cfg=cfg, train_data=SliceSet.concatenate(train_parts),
                  val_data=SliceSet.concatenate(val_parts) if val_parts else None, out_dir=a.out,
                  resume=a.resume, progress=not a.no_progress, run_config=_json(a.run_config, "--run-config", {}))
    world = gpus if torch.cuda.is_available() else a.cpu_processes
    world = min(world, torch.cuda.device_count()) if torch.cuda.is_available() else world
    best = train_data_parallel(world, **kwargs) if world > 1 else train(**kwargs)
    from unet_pipeline.report import plot_training

    plot_training(Path(a.out) / "training_log.csv", Path(a.out) / "training.png")
    print(f"trained model: {best}; loss and validation curves: {Path(a.out) / 'training.png'}")


def cmd_calibrate(a):
    """`unet-pipeline calibrate`: choose the segmentation settings on the validation slices, as predict predicts."""
    import torch

    from unet_pipeline import calibrate
    from unet_pipeline.geometry import UNetConfig
    from unet_pipeline.inference import load_predictor
    from unet_pipeline.train import concatenate_slices, load_labelled

    _use_threads(a.threads)
    torch.set_num_threads(a.threads)
    parts = [load_labelled(ds["raw"], ds["labels"], slices)
             for ds in _datasets(a.datasets, {"name", "raw", "labels"}, "and validate")
             if (slices := _slices_of(ds, "validate"))]
    if not parts:
        calibrate.write_record(a.out, calibrate.default_record("2d"))
        print(f"no validation slices: {a.out} records the default threshold 0.5")
        return
    images, truth = concatenate_slices(parts, "validation")
    expected = UNetConfig(**_json(a.model, "--model")) if a.model else None
    predictor = load_predictor(a.checkpoint, a.device, a.precision, _tta(a.tta), a.tile_size, None, expected,
                               expected_training=_json(a.run_config, "--run-config"))
    record = calibrate.choose_for_model(predictor, images, truth, a.dtype)
    calibrate.write_record(a.out, record)
    print(f"segmentation chosen on {record['validation_slices']} validation slices: {record['method']} ({a.out})")


def cmd_predict(a):
    """`unet-pipeline predict`: the probability map of a raw store (one part, or all and the finished store)."""
    import torch

    from unet_pipeline.geometry import Part, UNetConfig
    from unet_pipeline.inference import load_predictor
    from unet_pipeline.predict import predict_part

    _use_threads(a.threads)
    torch.set_num_threads(a.threads)
    expected = UNetConfig(**_json(a.model, "--model")) if a.model else None
    predictor = load_predictor(a.checkpoint, a.device, a.precision, _tta(a.tta), a.tile_size,
                               _batch_size(a.batch_size), expected, compile=a.compile == "1",
                               expected_training=_json(a.run_config, "--run-config"))
    part = a.part or Part(0, 1)
    summary = predict_part(predictor, a.raw, a.out, a.checkpoint, part, chunks=a.chunks,
                           chunks_per_file=a.chunks_per_file, out_dtype=a.dtype, tta=_tta(a.tta),
                           precision=a.precision, pyramid_levels=a.pyramid_levels, writers=a.writers,
                           progress=not a.no_progress)
    _after_part(a, summary, "predict")


def cmd_segment(a):
    """`unet-pipeline segment`: instance labels from a probability map (one step or part, or all and the finished store)."""
    from unet_pipeline import segment
    from unet_pipeline.blockwise import PartSummary
    from unet_pipeline.calibrate import resolve
    from unet_pipeline.geometry import Part

    _use_threads(a.threads)
    chosen = resolve(a.method, a.threshold, a.connectivity, a.seed_threshold, a.min_seed_px, a.calibration,
                     a.max_halo_px)
    log.info("segmenting with %s", chosen.describe())
    if a.step == "all":
        count = segment.segment(a.prob, a.out, settings=chosen, pyramid_levels=a.pyramid_levels, threads=a.threads)
        print(f"wrote {a.out}: {count} cells")
        return
    part = a.part or Part(0, 1)
    if a.step == "label":
        summary = segment.label_part(a.prob, a.out, part, settings=chosen, pyramid_levels=a.pyramid_levels,
                                     threads=a.threads)
    else:
        store, _ = segment.open_store(a.prob, a.out, chosen, a.pyramid_levels)
        if a.step == "join":
            summary = PartSummary(str(store.final), store.signature, "join", extra=segment.join(store, chosen))
        else:
            summary = segment.relabel_part(store, part, a.threads)
    summary.write(a.summary)
    print(f"segment {a.step}: done")


def cmd_pyramid(a):
    """`unet-pipeline pyramid`: one pyramid level of a store being written (one part)."""
    from unet_pipeline.blockwise import PartialStore
    from unet_pipeline.geometry import Part
    from unet_pipeline.pyramid import pyramid_part

    _use_threads(a.threads)
    summary = pyramid_part(PartialStore.from_marker(a.from_), a.level, a.part or Part(0, 1), a.threads)
    summary.write(a.summary)
    _report(summary, f"pyramid level {a.level}")


def cmd_finish(a):
    """`unet-pipeline finish`: check, complete and publish a store written in parts."""
    from unet_pipeline.finish import finish_from_marker

    _use_threads(a.threads)
    final = finish_from_marker(a.from_, a.first_unbuilt_level, a.threads)
    print(f"{final} is complete")


def cmd_evaluate(a):
    """`unet-pipeline evaluate`: ISBI 2012 metrics of a probability map and of a written segmentation."""
    from unet_pipeline.config import parse_slices
    from unet_pipeline.evaluate import evaluate, open_stack

    n = open_stack(a.labels).shape[0]
    slices = parse_slices(_json(a.slices, "--slices") if a.slices.startswith("[") else a.slices, n, "--slices")
    summary = evaluate(a.prob, a.labels, slices, a.out_json, a.out_slices, a.out_curves, a.out_plot, a.processes,
                       a.membrane_probability, a.kind, a.segmentation)
    names = ("pixel_error", "rand_error", "warping_error", "v_rand", "v_info")
    for scored in ("probability_map", "segmentation"):
        if scored in summary:
            print(scored, json.dumps({k: round(summary[scored][k], 6) for k in names}))


def cmd_report(a):
    """`unet-pipeline report`: the Markdown report."""
    from unet_pipeline.report import write_report

    bad = [item for item in a.metrics if "=" not in item]
    if bad:
        raise ConfigError(f"--metrics takes NAME=metrics.json, got {bad[0]!r}")
    metrics = dict(item.split("=", 1) for item in a.metrics)
    write_report(a.out, a.log, metrics, _json(a.example, "--example"))
    print(f"report: {a.out}")


def cmd_view(a):
    """`unet-pipeline view`: raw, probabilities and segmentation of a dataset in neuroglancer, served locally."""
    from unet_pipeline.view import VIEW_PORT, serve

    serve(a.results, VIEW_PORT if a.port is None else a.port, open_browser=not a.no_browser)


def cmd_validate_config(a):
    """`unet-pipeline validate-config`: check config files and the stacks they name."""
    from unet_pipeline.config import check_sources, load_config

    config = load_config(*a.files)
    shapes = check_sources(config)
    print("config is valid; stacks: " + ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items()))


# --------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The subcommands; every default that is also a config key comes from the config schema."""
    d = schema.default
    synth = schema.synthetic_defaults()
    label_format = schema.dataset_key("label_format")
    p = _Parser(prog="unet-pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def threads(s):
        s.add_argument("--threads", type=_positive, default=os.cpu_count(), help="CPU threads of this job")

    def part(s, what):
        s.add_argument("--part", type=_part, help=f"i/N: only this job's share of {what}; without it, all of it "
                                                  "and the finished store")
        s.add_argument("--summary", help="write this job's summary (JSON) here")

    def layout(s, section):
        s.add_argument("--chunks", type=_zyx, default=tuple(d(f"{section}.chunks")), help="Z,Y,X")
        s.add_argument("--chunks-per-file", type=_zyx, default=tuple(d(f"{section}.chunks_per_file")),
                       help="chunks per Zarr v3 shard (one file, the unit of work); 1,1,1 = no sharding")

    def levels(s):
        s.add_argument("--pyramid-levels", type=_levels, default=d("pyramid.levels"),
                       help="downsampled levels: auto (down to one chunk per slice) or a number")

    s = sub.add_parser("synth", help="generate an EM-like stack with exact ground truth")
    s.add_argument("--out-raw", required=True)
    s.add_argument("--out-labels", required=True)
    s.add_argument("--slices", type=_positive, default=synth["slices"])
    s.add_argument("--shape", type=_ints, default=tuple(synth["shape"]), help="Y,X in pixels")
    s.add_argument("--seed", type=int, default=synth["seed"])
    s.add_argument("--cell-diameter-px", type=float, default=synth["cell_diameter_px"])
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("preprocess", help="TIFF/Zarr stack -> chunked OME-Zarr (raw with statistics, or labels)")
    s.add_argument("--raw", required=True, help="the raw stack (TIFF, TIFF folder, Zarr, OME-Zarr)")
    s.add_argument("--labels", help="write this label stack (checked against --raw) instead of the raw one")
    s.add_argument("--out", required=True, help="the OME-Zarr to write")
    layout(s, "preprocess")
    s.add_argument("--voxel-size", type=_voxel_size, default=d("preprocess.voxel_size_nm"),
                   help="Z,Y,X in nm, or auto (from the file's metadata)")
    s.add_argument("--voxel-size-key", default="--voxel-size", help=argparse.SUPPRESS)
    s.add_argument("--label-format", default=label_format["default"], choices=label_format["enum"])
    levels(s)
    threads(s)
    part(s, "the strips")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("weights", help="the paper's weight maps from a label OME-Zarr")
    s.add_argument("--labels", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--w0", type=float, default=d("weights.w0"))
    s.add_argument("--sigma-px", type=float, default=d("weights.sigma_px"))
    s.add_argument("--label-format", default=label_format["default"], choices=label_format["enum"])
    levels(s)
    threads(s)
    s.set_defaults(func=cmd_weights)

    s = sub.add_parser("train", help="train the U-Net")
    s.add_argument("--datasets", required=True, help="JSON list of {name, raw, labels, weights, train, validate}")
    s.add_argument("--model", default="{}", help="JSON of the model section (schema defaults for missing keys)")
    s.add_argument("--train", default="{}", help="JSON of the train section (schema defaults for missing keys)")
    s.add_argument("--run-config", help="JSON of the resolved config the model is trained with; stored in the "
                                        "checkpoint and checked by predict")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true",
                   help="continue OUT/last.pt if it is a run on the same data and config")
    threads(s)
    s.add_argument("--cpu-processes", type=_positive, default=1, help="data-parallel CPU processes (gloo) without "
                                                                      "GPUs")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("calibrate", help="choose the segmentation settings on the validation slices with the "
                                         "trained model, predicting them as predict will")
    s.add_argument("--checkpoint", required=True, help="the trained model (model.pt)")
    s.add_argument("--datasets", required=True, help="JSON list of {name, raw, labels, validate}")
    s.add_argument("--model", help="JSON of the model section: refuse a checkpoint trained with another one")
    s.add_argument("--run-config", help="JSON of the training config expected of the checkpoint (as predict's)")
    s.add_argument("--out", required=True, help="where the choice is written (segmentation.json)")
    s.add_argument("--tile-size", type=_positive, default=d("predict.tile_size"), help="predict's tile size")
    s.add_argument("--dtype", default=d("predict.dtype"), choices=schema.choices("predict.dtype"),
                   help="the dtype predict stores probabilities as")
    s.add_argument("--tta", default=str(d("predict.tta")), help="predict's test-time augmentation")
    s.add_argument("--device", default=d("predict.device"))
    s.add_argument("--precision", default=d("predict.precision"), choices=schema.choices("predict.precision"))
    threads(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("predict", help="overlap-tile prediction into a probability OME-Zarr")
    s.add_argument("--raw", required=True, help="the raw OME-Zarr written by preprocess")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--model", help="JSON of the model section: refuse a checkpoint trained with another one")
    s.add_argument("--run-config", help="JSON of the training config expected of the checkpoint (as train's "
                                        "--run-config): another model is refused, other differences warned about")
    s.add_argument("--out", required=True)
    s.add_argument("--tile-size", type=_positive, default=d("predict.tile_size"))
    layout(s, "predict")
    s.add_argument("--dtype", default=d("predict.dtype"), choices=schema.choices("predict.dtype"))
    s.add_argument("--tta", default=str(d("predict.tta")))
    s.add_argument("--device", default=d("predict.device"))
    s.add_argument("--precision", default=d("predict.precision"), choices=schema.choices("predict.precision"))
    s.add_argument("--batch-size", default=str(d("predict.batch_size")),
                   help="network inputs per forward pass (tiles x TTA transforms), or auto: chosen for the device")
    s.add_argument("--compile", nargs="?", const="1", default="1" if d("predict.compile") else "0",
                   choices=("0", "1"), help="torch.compile the network (falls back with a warning); --compile 0 "
                                            "turns it off")
    s.add_argument("--writers", type=_positive, default=d("predict.writers"),
                   help="threads that compress and write blocks")
    levels(s)
    threads(s)
    part(s, "the strips")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("segment", help="threshold + connected components into an OME-Zarr label image")
    s.add_argument("--prob", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--step", default="all", choices=("all", "label", "join", "relabel"),
                   help="all (default), or one step of the workflow's jobs: label blocks (parts), join labels "
                        "across block faces (one job), relabel blocks (parts)")
    s.add_argument("--method", default=d("segment.method"), choices=schema.choices("segment.method"))
    s.add_argument("--threshold", type=_auto_or(float), default=d("segment.threshold"),
                   help="cell where p > threshold, or auto (chosen on validation slices: --calibration)")
    s.add_argument("--seed-threshold", type=_auto_or(float), default=d("segment.watershed.seed_threshold"))
    s.add_argument("--min-seed-px", type=_auto_or(int), default=d("segment.watershed.min_seed_px"))
    s.add_argument("--max-halo-px", type=_positive, default=d("segment.watershed.max_halo_px"))
    s.add_argument("--calibration", help="the model's segmentation.json: the settings chosen on validation slices")
    s.add_argument("--connectivity", default=d("segment.connectivity"), choices=schema.choices("segment.connectivity"))
    levels(s)
    threads(s)
    part(s, "the blocks")
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("pyramid", help="one pyramid level (or a job's share of it) of a store being written")
    s.add_argument("--from", dest="from_", required=True, help="a summary written by a job of the store")
    s.add_argument("--level", type=_positive, required=True)
    threads(s)
    part(s, "the level's blocks")
    s.set_defaults(func=cmd_pyramid)

    s = sub.add_parser("finish", help="check every block of a store written in parts, build its coarse levels, "
                                      "publish it")
    s.add_argument("--from", dest="from_", required=True, help="a summary written by a job of the store")
    s.add_argument("--first-unbuilt-level", type=_positive, default=1,
                   help="levels from this one on are built here (the ones before had jobs of their own)")
    threads(s)
    s.set_defaults(func=cmd_finish)

    s = sub.add_parser("evaluate", help="ISBI 2012 metrics on test slices")
    s.add_argument("--prob", required=True, help="probability OME-Zarr, or any TIFF/Zarr stack")
    s.add_argument("--labels", required=True, help="labels OME-Zarr or TIFF/Zarr stack (255 = cell)")
    s.add_argument("--segmentation", help="also score this label image as written (labels as labels)")
    s.add_argument("--slices", default="all")
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-slices", required=True)
    s.add_argument("--out-curves", required=True)
    s.add_argument("--out-plot")
    s.add_argument("--processes", type=_positive, default=d("evaluate.processes"),
                   help="processes scoring slices in parallel")
    s.add_argument("--membrane-probability", action="store_true", help="the map gives membrane probability")
    s.add_argument("--kind", default="probability",
                   help="probability (a map), binary (non-zero = cell) or instances (labels scored as labels); "
                        "checked by the metrics")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="Markdown report with figures")
    s.add_argument("--out", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--metrics", nargs="*", default=[], help="NAME=metrics.json")
    s.add_argument("--example", help="JSON {dataset, raw, prob, seg, slice}")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("view", help="look at a dataset's results in neuroglancer (served on 127.0.0.1)")
    s.add_argument("results", help="a dataset's results folder, e.g. results/<dataset>")
    s.add_argument("--port", type=int, help="port of the viewer on 127.0.0.1 (default: the one the report's link "
                                            "expects), the stores' server on the next one; 0: any free ones")
    s.add_argument("--no-browser", action="store_true", help="only print the link (e.g. on a remote node)")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("validate-config", help="check config files against the schema and the stacks' headers")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_validate_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 with one sentence on stderr for a user's error."""
    prefer_sleeping_openmp_threads()  # before torch is imported
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PipelineError as exc:
        return _fail(args.command, str(exc))
    except OSError as exc:  # a file that cannot be read or written: permissions, disk full, a missing folder
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args.command, f"{where}{exc.strerror or exc}")
    return 0


def _fail(command: str, message: str) -> int:
    print(f"unet-pipeline {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
