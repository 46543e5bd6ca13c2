"""`unet-pipeline <stage>`: one subcommand per workflow stage.

Snakemake rules call these (with arguments from `stages`), and each also
runs on its own. Option defaults are the config schema's. Errors meant for
users (bad input, bad config, a file that cannot be read or written) are
printed as one sentence that names the file or key, without a traceback,
and the command exits with status 2. Library code reports through `logging`;
the CLI sends it to stderr, one message per line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from unet_pipeline.config import defaults, load_schema
from unet_pipeline.errors import ConfigError, PipelineError
from unet_pipeline.threads import prefer_sleeping_openmp_threads


CHUNKS_PER_FILE_HELP = "chunks per Zarr v3 shard (one file; for predict also one unit of work), default 1,8,8; 1,1,1 = no sharding"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the one sentence every subcommand promises: no usage block, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _json(text: str | None, option: str, default=None):
    """A JSON option's value, or ConfigError naming the option."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}") from None


def cmd_synth(a):
    import tifffile

    from unet_pipeline.io import atomic_file
    from unet_pipeline.synthetic import synthesize_labels_and_raw

    raw, labels = synthesize_labels_and_raw(a.slices, a.shape, a.seed, a.cell_diameter_px)
    for path, data in ((a.out_raw, raw), (a.out_labels, labels)):
        with atomic_file(path) as tmp:
            tifffile.imwrite(tmp, data, photometric="minisblack")
    print(f"wrote {a.out_raw} and {a.out_labels}: {raw.shape}")


def cmd_preprocess(a):
    from unet_pipeline.preprocess import preprocess

    if (a.labels is None) != (a.out_labels is None):
        raise PipelineError("--labels and --out-labels go together")
    if a.out_raw is None and a.out_labels is None:
        raise PipelineError("nothing to write: give --out-raw and/or --labels with --out-labels")
    preprocess(a.raw, a.out_raw, a.labels, a.out_labels, a.chunks, a.voxel_size, a.label_format, a.chunks_per_file)
    print(f"wrote {', '.join(p for p in (a.out_raw, a.out_labels) if p)}")


def cmd_weights(a):
    from unet_pipeline.weights import write_weights

    write_weights(a.labels, a.out, a.w0, a.sigma_px, a.label_format)
    print(f"wrote {a.out}")


def cmd_train(a):
    import torch

    from unet_pipeline.config import parse_slices
    from unet_pipeline.io import open_ome_image
    from unet_pipeline.model import UNetConfig
    from unet_pipeline.train import SliceSet, TrainConfig, load_slices, train, train_data_parallel

    torch.set_num_threads(a.threads)
    model_cfg = UNetConfig(**_json(a.model, "--model"))
    train_values = _json(a.train, "--train")
    gpus = int(train_values.pop("gpus", 1))
    cfg = TrainConfig.from_dict(train_values)
    train_parts, val_parts = [], []
    datasets = _json(a.datasets, "--datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) and {"name", "raw", "labels", "weights"} <= set(d)
                                                 for d in datasets):
        raise ConfigError("--datasets must be a JSON list of objects with name, raw, labels, weights (and train, "
                          "validate)")
    for ds in datasets:
        n = open_ome_image(ds["raw"]).shape[0]
        tr = parse_slices(ds.get("train"), n, f"datasets.{ds['name']}.train")
        va = parse_slices(ds.get("validate"), n, f"datasets.{ds['name']}.validate")
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


def cmd_predict(a):
    import torch

    from unet_pipeline.inference import load_predictor
    from unet_pipeline.model import UNetConfig
    from unet_pipeline.predict import parse_shard, predict_volume, write_summary

    from unet_pipeline.checkpoint import check_training_config, model_from_checkpoint

    torch.set_num_threads(a.threads)
    expected = UNetConfig(**_json(a.model, "--model")) if a.model else None
    training = _json(a.run_config, "--run-config")
    shard = parse_shard(a.shard)
    if a.init_only:  # no network is run: check the checkpoint on the CPU, whatever the device
        _, state = model_from_checkpoint(a.checkpoint, expected)
        if training is not None:
            check_training_config(a.checkpoint, state, training)
        predictor = None
    else:
        predictor = load_predictor(a.checkpoint, a.device, a.precision, _tta(a.tta), a.tile_size,
                                   _batch_size(a.batch_size), expected, compile=a.compile == "1",
                                   expected_training=training)
    stats = predict_volume(predictor, a.raw, a.out, a.checkpoint, a.chunks, a.dtype, shard,
                           a.workers, a.overwrite, not a.no_progress, a.precision, _tta(a.tta), a.init_only,
                           a.chunks_per_file)
    if a.summary:
        write_summary(a.summary, stats)
    print(f"predicted {stats.blocks_computed} blocks ({stats.blocks_skipped} already done) into {a.out}")


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise PipelineError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return int(value)


def _tta(value: str):
    return int(value) if value.isdigit() else value


def cmd_gather(a):
    from unet_pipeline.io import atomic_write_text
    from unet_pipeline.predict import gather

    gather(a.out, a.pyramid_levels)
    if a.done_file:
        atomic_write_text(a.done_file, f"{a.out}\n")
    print(f"{a.out} is complete")


def cmd_segment(a):
    from unet_pipeline.segment import segment

    count = segment(a.prob, a.out, a.threshold, a.connectivity, a.workers)
    print(f"wrote {a.out}: {count} cells")


def cmd_evaluate(a):
    from unet_pipeline.config import parse_slices
    from unet_pipeline.evaluate import evaluate, open_stack

    n = open_stack(a.labels).shape[0]
    slices = parse_slices(_json(a.slices, "--slices") if a.slices.startswith("[") else a.slices, n, "--slices")
    summary = evaluate(a.prob, a.labels, slices, a.out_json, a.out_slices, a.out_curves, a.out_plot, a.workers,
                       a.membrane_probability, a.kind)
    print(json.dumps({k: summary[k] for k in ("pixel_error", "rand_error", "warping_error", "v_rand", "v_info")}))


def cmd_report(a):
    from unet_pipeline.report import write_report

    bad = [item for item in a.metrics if "=" not in item]
    if bad:
        raise ConfigError(f"--metrics takes NAME=metrics.json, got {bad[0]!r}")
    metrics = dict(item.split("=", 1) for item in a.metrics)
    write_report(a.out, a.log, metrics, _json(a.example, "--example"))
    print(f"report: {a.out}")


def cmd_validate_config(a):
    from unet_pipeline.config import load_config

    load_config(*a.files)
    print("config is valid")


def build_parser() -> argparse.ArgumentParser:
    """The subcommands; every default that is also a config key comes from the config schema."""
    pre, wts, pred, seg, ev = (defaults(k) for k in ("preprocess", "weights", "predict", "segment", "evaluate"))
    schema = load_schema()
    synth = {k: v["default"] for k, v in schema["$defs"]["synthetic_stack"]["properties"].items()}
    label_format = schema["properties"]["datasets"]["additionalProperties"]["properties"]["label_format"]
    p = _Parser(prog="unet-pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate an EM-like stack with exact ground truth")
    s.add_argument("--out-raw", required=True)
    s.add_argument("--out-labels", required=True)
    s.add_argument("--slices", type=_positive, default=synth["slices"])
    s.add_argument("--shape", type=_ints, default=tuple(synth["shape"]), help="Y,X in pixels")
    s.add_argument("--seed", type=int, default=synth["seed"])
    s.add_argument("--cell-diameter-px", type=float, default=synth["cell_diameter_px"])
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("preprocess", help="TIFF/Zarr stack -> chunked OME-Zarr with normalisation statistics")
    s.add_argument("--raw", required=True)
    s.add_argument("--out-raw", help="raw OME-Zarr to write (omit to write only labels)")
    s.add_argument("--labels")
    s.add_argument("--out-labels")
    s.add_argument("--chunks", type=_zyx, default=tuple(pre["chunks"]), help="Z,Y,X")
    s.add_argument("--chunks-per-file", type=_zyx, default=tuple(pre["chunks_per_file"]), help=CHUNKS_PER_FILE_HELP)
    s.add_argument("--voxel-size", type=_floats, default=tuple(pre["voxel_size_nm"]), help="Z,Y,X in nm")
    s.add_argument("--label-format", default=label_format["default"], choices=label_format["enum"])
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("weights", help="the paper's weight maps from a label OME-Zarr")
    s.add_argument("--labels", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--w0", type=float, default=wts["w0"])
    s.add_argument("--sigma-px", type=float, default=wts["sigma_px"])
    s.add_argument("--label-format", default=label_format["default"], choices=label_format["enum"])
    s.set_defaults(func=cmd_weights)

    s = sub.add_parser("train", help="train the U-Net")
    s.add_argument("--datasets", required=True, help="JSON list of {name, raw, labels, weights, train, validate}")
    s.add_argument("--model", default="{}", help="JSON of the model section (schema defaults for missing keys)")
    s.add_argument("--train", default="{}", help="JSON of the train section (schema defaults for missing keys)")
    s.add_argument("--run-config", help="JSON of the resolved config the model is trained with; stored in the "
                                        "checkpoint and checked by predict")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true",
                   help="continue OUT/last.pt if it is an unfinished run on the same data and config")
    s.add_argument("--threads", type=_positive, default=os.cpu_count())
    s.add_argument("--cpu-processes", type=_positive, default=1, help="data-parallel CPU processes (gloo) without GPUs")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="overlap-tile prediction of one shard into an OME-Zarr")
    s.add_argument("--raw", required=True)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--model", help="JSON of the model section: refuse a checkpoint trained with another one")
    s.add_argument("--run-config", help="JSON of the training config expected of the checkpoint (as train's "
                                        "--run-config): another model is refused, other differences warned about")
    s.add_argument("--out", required=True)
    s.add_argument("--tile-size", type=_positive, default=pred["tile_size"])
    s.add_argument("--chunks", type=_zyx, default=tuple(pred["chunks"]), help="Z,Y,X")
    s.add_argument("--chunks-per-file", type=_zyx, default=tuple(pred["chunks_per_file"]), help=CHUNKS_PER_FILE_HELP)
    s.add_argument("--dtype", default=pred["dtype"], choices=("float16", "float32", "uint8"))
    s.add_argument("--tta", default=pred["tta"])
    s.add_argument("--shard", default="0/1", help="i/N: this job's share of the blocks")
    s.add_argument("--device", default=pred["device"])
    s.add_argument("--precision", default=pred["precision"], choices=("auto", "bf16", "fp16", "fp32"))
    s.add_argument("--batch-size", default=str(pred["batch_size"]),
                   help="network inputs per forward pass (tiles x TTA transforms), or auto: chosen for the device")
    s.add_argument("--compile", nargs="?", const="1", default="1" if pred["compile"] else "0", choices=("0", "1"),
                   help="torch.compile the network (falls back with a warning); --compile 0 turns it off")
    s.add_argument("--workers", type=_positive, default=pred["writers"], help="writer threads (compression runs there)")
    s.add_argument("--threads", type=_positive, default=os.cpu_count())
    s.add_argument("--overwrite", action="store_true", help="replace an output store of a different prediction")
    s.add_argument("--init-only", action="store_true", help="only create the output store (before the shards run)")
    s.add_argument("--summary", help="write a JSON summary of this shard here")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("gather", help="check all predict shards, build the pyramid, mark complete")
    s.add_argument("--out", required=True)
    s.add_argument("--pyramid-levels", type=int, default=pred["pyramid_levels"])
    s.add_argument("--done-file")
    s.set_defaults(func=cmd_gather)

    s = sub.add_parser("segment", help="threshold + connected components into an OME-Zarr label image")
    s.add_argument("--prob", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--threshold", type=float, default=seg["threshold"])
    s.add_argument("--connectivity", default=seg["connectivity"], choices=("2d", "3d"))
    s.add_argument("--workers", type=_positive, default=2)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("evaluate", help="ISBI 2012 metrics on test slices")
    s.add_argument("--prob", required=True, help="probability OME-Zarr, or any TIFF/Zarr stack")
    s.add_argument("--labels", required=True, help="labels OME-Zarr or TIFF/Zarr stack (255 = cell)")
    s.add_argument("--slices", default="all")
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-slices", required=True)
    s.add_argument("--out-curves", required=True)
    s.add_argument("--out-plot")
    s.add_argument("--workers", type=_positive, default=ev["workers"])
    s.add_argument("--membrane-probability", action="store_true", help="the map gives membrane probability")
    s.add_argument("--kind", default="probability", choices=("probability", "binary", "instances"))
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="Markdown report with figures")
    s.add_argument("--out", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--metrics", nargs="*", default=[], help="NAME=metrics.json")
    s.add_argument("--example", help="JSON {dataset, raw, prob, seg, slice}")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("validate-config", help="check config files against the schema")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_validate_config)
    return p


def main(argv: list[str] | None = None) -> int:
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
