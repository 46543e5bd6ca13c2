"""Training loop: weighted softmax cross entropy, SGD momentum 0.99, one large tile.

Follows the paper (UNET.md, "Training"): pixel-wise softmax over the output
with cross entropy weighted by the precomputed weight map, SGD with momentum
0.99 and a batch of a single tile by default (Adam optional), elastic
augmentation on the device (`augment.py`). Loss = mean over output pixels of
w(x) * -log p_l(x) (the paper's sum divided by the tile area, so that the
learning rate does not depend on the tile size).

Checkpoints hold model, optimiser, scheduler, step, every RNG state and the
config, so `--resume` continues exactly (tested: N straight steps == N/2 +
resume + N/2). Every `validate_every` steps the validation slices are
predicted with full overlap-tile inference and scored (pixel and Rand error);
the checkpoint with the best Rand error is kept as the model. With several
processes (torch.distributed: NCCL on GPUs, gloo on CPU) the model is
data-parallel and rank 0 validates, logs and saves.
"""
from __future__ import annotations

import csv
import logging
import math
import shutil
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from unet_pipeline import atomic, stores
from unet_pipeline.augment import AugmentConfig, sample_tiles
from unet_pipeline.checkpoint import load_checkpoint, save_checkpoint
from unet_pipeline import schema
from unet_pipeline.device import autocast, describe, resolve_device, resolve_dtype, tune_convolutions
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.metrics import aggregate, slice_statistics
from unet_pipeline.model import UNet, UNetConfig
from unet_pipeline.inference import Predictor
from unet_pipeline.normalise import Normaliser
from unet_pipeline.provenance import ContentHash, derive_fingerprint

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "loss", "lr", "seconds", "val_loss", "val_pixel_error", "val_rand_error"]



@dataclass(frozen=True)
class TrainConfig:
    """The train section of the config as the training loop uses it (defaults: the config schema's)."""

    steps: int = schema.field("train.steps")
    tile_size: int = schema.field("train.tile_size")          # output tile side; the input is tile + 2 * context margin
    batch_size: int = schema.field("train.batch_size")
    optimizer: str = schema.field("train.optimizer")
    learning_rate: float = schema.field("train.learning_rate")  # for SGD with momentum 0.99 on the mean-per-pixel loss
    momentum: float = schema.field("train.momentum")
    weight_decay: float = schema.field("train.weight_decay")
    lr_schedule: str = schema.field("train.lr_schedule")      # constant | cosine | step
    validate_every: int = schema.field("train.validate_every")
    checkpoint_every: int = schema.field("train.checkpoint_every")
    log_every: int = schema.field("train.log_every")          # steps between loss reads: each one waits for the device
    seed: int = schema.field("train.seed")
    device: str = schema.field("train.device")
    precision: str = schema.field("train.precision")
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ConfigError("train.steps, train.batch_size and train.log_every must be at least 1")
        for key in ("optimizer", "lr_schedule"):
            if getattr(self, key) not in schema.choices(f"train.{key}"):
                raise ConfigError(f"train.{key} must be one of {schema.choices(f'train.{key}')}, got "
                                  f"{getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The train section of a config (its `augment` entry as an AugmentConfig)."""
        values = dict(values)
        values["augment"] = AugmentConfig(**values.get("augment", {}))
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain data, for checkpoints and fingerprints."""
        return asdict(self)


@dataclass
class SliceSet:
    """Normalised images, class labels (1 = cell) and weights of some slices, in memory."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    def fingerprint(self) -> str:
        """Checksum of the images, labels and weights: what a checkpoint was trained on."""
        content = ContentHash()
        for array in (self.images, self.labels, self.weights):
            content.update(array)
        return content.hexdigest()

    @classmethod
    def concatenate(cls, parts: list["SliceSet"]) -> "SliceSet":
        """Slices of several datasets as one set (they must share a slice size)."""
        return cls(*concatenate_slices([(p.images, p.labels, p.weights) for p in parts], "training"))


def concatenate_slices(parts: list[tuple[np.ndarray, ...]], what: str) -> tuple[np.ndarray, ...]:
    """Arrays of several datasets' slices, each position concatenated along z; InputError unless one slice size."""
    shapes = {arrays[0].shape[1:] for arrays in parts}
    if len(shapes) > 1:
        raise InputError(f"{what} slices differ in size {sorted(shapes)}; use datasets of one slice size.")
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def load_labelled(raw_path, labels_path, slices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Slices of a dataset in memory: normalised images (float32) and class labels (uint8, 1 = cell)."""
    raw = stores.open_image(raw_path)
    normalise = Normaliser.from_attrs(raw.attrs, str(raw_path))
    labels = stores.open_image(labels_path)
    bad = [z for z in slices if not 0 <= z < raw.shape[0]]
    if bad:
        raise ConfigError(f"slices {bad} are outside {raw_path} (it has {raw.shape[0]} slices)")
    return (np.stack([normalise(np.asarray(raw[z])) for z in slices]),
            np.stack([(np.asarray(labels[z]) > 0).astype(np.uint8) for z in slices]))


def load_slices(raw_path, labels_path, weights_path, slices: list[int]) -> SliceSet:
    """Slices of a dataset's stores in memory: normalised images, class labels (1 = cell), weight maps."""
    images, labels = load_labelled(raw_path, labels_path, slices)
    weights = stores.open_image(weights_path)
    return SliceSet(images, labels, np.stack([np.asarray(weights[z]) for z in slices]).astype(np.float32))


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of w(x) * -log softmax(logits)_{l(x)}(x) (paper, Eq. 1)."""
    per_pixel = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_pixel * weights).mean()


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    elif cfg.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.steps // 3), gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def validate(model: UNet, data: SliceSet, device, dtype, tile_size: int) -> dict:
    """Full overlap-tile inference on the validation slices; loss, pixel and Rand error."""
    was_training = model.training
    predictor = Predictor(model, device, tile_size, dtype)
    prob = predictor.predict_image(data.images)
    model.train(was_training)
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    nll = -np.where(data.labels == 1, np.log(p), np.log(1 - p))
    gt = data.labels.astype(np.float64) * 255
    scores = aggregate([slice_statistics(gt[z], prob[z].astype(np.float64), ("pixel", "rand"))
                        for z in range(gt.shape[0])])
    return {"val_loss": float((nll * data.weights).mean()),
            "val_pixel_error": scores.pixel_error, "val_rand_error": scores.rand_error}


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic.atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def train(
    model_cfg: UNetConfig,
    cfg: TrainConfig,
    train_data: SliceSet,
    val_data: SliceSet | None,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    run_config: dict | None = None,
    max_steps_now: int | None = None,
) -> Path:
    """Train and return the path of the best model checkpoint (`model.pt` in out_dir).

    out_dir receives `last.pt` (for resuming), `best.pt` (best by validation
    Rand error so far), and when the run is finished `model.pt` (the best, or
    the last without a validation set) and `training_log.csv`. The
    segmentation settings are chosen afterwards, by `calibrate`, on
    validation slices predicted as predict will predict: a job of its own, so
    that a change of predict's settings never retrains the network.
    `max_steps_now` stops after that many steps of this call (to fit a job's
    time limit); a later call with `resume=True` continues exactly.

    Resuming continues `last.pt` only if it is unfinished and was trained on
    the same data (checksum of images, labels and weight maps) with the same
    model and train config: anything else starts a new run, so that new data
    or weights are never silently mixed into an old run, and a finished run
    is trained again rather than "resumed" for zero steps. The log rows live
    in the checkpoint too, so a resumed run's log is whole even when the
    workflow removed `training_log.csv` before rerunning the job.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.precision, device)
    tune_convolutions(device, dtype)
    if rank == 0:
        log.info("training on %s", describe(device, dtype, cfg.device, cfg.precision))
    in_size = model_cfg.input_size(cfg.tile_size)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    # channels_last: 1.6x faster convolutions on CPU (oneDNN), and the layout tensor cores want.
    model = UNet(model_cfg).to(device).to(memory_format=torch.channels_last)
    opt, sched = _make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    step, best = 0, math.inf
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    model_path, log_path = out_dir / "model.pt", out_dir / "training_log.csv"
    fingerprint = derive_fingerprint(
        "train", model_cfg.to_dict(), cfg.to_dict(), train_data.fingerprint(),
        val_data.fingerprint() if val_data is not None else None,
    )
    state = _resumable(last_path, fingerprint, cfg.steps) if resume else None
    log_rows: list[dict] = []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best_val_rand_error"]
        _set_rng_state(state["rng"], gen)
        log_rows = list(state["log"])
        log.info("%s: resuming at step %d of %d", last_path, step, cfg.steps)
    elif rank == 0:
        for stale in (best_path, model_path, log_path):  # not another run's results
            stale.unlink(missing_ok=True)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    images = torch.from_numpy(train_data.images.astype(np.float32, copy=False)).to(device)
    labels = torch.from_numpy(train_data.labels).to(device)
    weights = torch.from_numpy(train_data.weights.astype(np.float32, copy=False)).to(device)

    def checkpoint(path: Path):
        save_checkpoint(path, {
            "model": model.state_dict(), "model_config": model_cfg.to_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "best_val_rand_error": best, "rng": _rng_state(gen), "train_config": cfg.to_dict(),
            "config": run_config or {}, "fingerprint": fingerprint, "log": log_rows,
        })

    net.train()
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not progress or rank != 0, desc="train")
    start = time.perf_counter()
    stop_at = cfg.steps if max_steps_now is None else min(cfg.steps, step + max_steps_now)

    def is_validation_step(at: int) -> bool:
        return val_data is not None and (at % cfg.validate_every == 0 or at == cfg.steps)

    def run_validation(row: dict) -> None:
        nonlocal best
        scores = validate(model, val_data, device, dtype, cfg.tile_size)
        row.update(scores)
        log.info("step %d: validation rand error %.4f, pixel error %.4f", row["step"], scores["val_rand_error"],
                 scores["val_pixel_error"])
        if scores["val_rand_error"] < best:
            best = scores["val_rand_error"]
            checkpoint(best_path)

    if rank == 0 and log_rows and log_rows[-1]["step"] == step and is_validation_step(step) \
            and log_rows[-1]["val_rand_error"] == "":
        # Killed during this step's validation, after its checkpoint: the restored
        # weights are exactly that step's, so validate them now (no training repeated).
        run_validation(log_rows[-1])
        checkpoint(last_path)
    # The loss stays on the device and is read every `log_every` steps (and at
    # validation and checkpoint steps): reading it waits for the device, and
    # without that wait the next step's tile sampling and augmentation are
    # queued while the current step still runs.
    loss_sum, since_log = torch.zeros((), device=device), 0
    while step < stop_at:
        tiles = sample_tiles(images, labels, weights, cfg.batch_size, in_size, cfg.tile_size, cfg.augment, gen)
        with autocast(device, dtype):
            logits = net(tiles.image)
        loss = weighted_cross_entropy(logits, tiles.labels, tiles.weights)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        loss_sum += loss.detach()
        since_log += 1
        bar.update(1)
        validating = is_validation_step(step)
        saving = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if not (step % cfg.log_every == 0 or saving or validating or step == stop_at):
            continue
        mean_loss = loss_sum.item() / since_log
        loss_sum.zero_()
        since_log = 0
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"training diverged by step {step} (loss {mean_loss}); lower train.learning_rate.")
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if rank != 0:
            continue
        row = {"step": step, "loss": mean_loss, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - start, "val_loss": "", "val_pixel_error": "", "val_rand_error": ""}
        log_rows.append(row)
        if saving:  # before validating: a job killed during validation resumes here, not at the last save
            checkpoint(last_path)
        if validating:
            run_validation(row)
            if saving:
                checkpoint(last_path)  # now with this step's validation in its log
        if saving:
            _write_log(log_path, log_rows)
    bar.close()
    if rank == 0:
        if step < cfg.steps:
            checkpoint(last_path)  # stopped early (max_steps_now): resumable from here
        else:
            _finish(out_dir, fingerprint, val_data is not None, checkpoint)
        _write_log(log_path, log_rows)
    return model_path


def _finish(out_dir: Path, fingerprint: str, validated: bool, checkpoint) -> None:
    """Publish the run's product: `model.pt`, a copy of the best validated checkpoint (the last without validation).

    Logged with the step and validation scores it was chosen for, so that a
    user knows which network predicted their volume.
    """
    best_path, model_path = out_dir / "best.pt", out_dir / "model.pt"
    if not validated or not best_path.exists() or load_checkpoint(best_path).get("fingerprint") != fingerprint:
        checkpoint(best_path)
    chosen = load_checkpoint(best_path)
    row = next((r for r in chosen["log"] if r["step"] == chosen["step"]), {})
    with atomic.atomic_file(model_path) as tmp:  # the run's product appears only when it is finished
        shutil.copyfile(best_path, tmp)
    if validated:
        log.info("%s: the checkpoint of step %d, best validation Rand error %.4f (pixel error %s)", model_path,
                 chosen["step"], chosen["best_val_rand_error"], row.get("val_pixel_error", "?"))
    else:
        log.info("%s: the checkpoint of the last step, %d (no validation slices to choose by)", model_path,
                 chosen["step"])


def _resumable(last_path: Path, fingerprint: str, steps: int) -> dict | None:
    """`last.pt` if it is a run on the same data and config; else None (with the reason logged).

    A finished run is returned too: its model is published again without
    training a step (Snakemake removes `model.pt` before rerunning the job,
    and a kill after the last step must not cost the whole training).
    """
    if not last_path.exists():
        return None
    state = load_checkpoint(last_path)
    if state.get("fingerprint") != fingerprint:
        log.info("%s: trained on other data or with another config; starting a new run", last_path)
        return None
    if state["step"] >= steps:
        log.info("%s: that run finished all %d steps; publishing its model without training again", last_path,
                 state["step"])
    return state


def train_worker(rank: int, world_size: int, port: int, kwargs: dict) -> None:
    """Entry point of one data-parallel process (torch.multiprocessing.spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    backend = "nccl" if torch.cuda.is_available() and kwargs["cfg"].device != "cpu" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        train(**kwargs)
    finally:
        dist.destroy_process_group()


def train_data_parallel(world_size: int, **kwargs) -> Path:
    """Run `train` in `world_size` processes (one per GPU, or CPU processes with gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train_worker, args=(world_size, port, kwargs), nprocs=world_size, join=True)
    return Path(kwargs["out_dir"]) / "model.pt"
