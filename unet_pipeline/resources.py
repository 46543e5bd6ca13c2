"""What each job of the workflow asks of the cluster, computed from the volume before anything runs.

The workflow reads each stack's shape from its header (`config.check_sources`)
and plans every block-wise stage from it: how many parts (jobs) split the
stage so that each takes about `cluster.job_minutes` at the stage's measured
throughput, which pyramid levels need jobs of their own, and each job's
threads, memory (its buffers, from the block and strip sizes, plus the
framework) and walltime (its share of voxels at the throughput, with a 50%
margin and ten minutes for starting). A dry run therefore shows the real
requests of a terabyte, and a plan that would exceed
`cluster.max_job_minutes` or `cluster.max_job_mem_mb` is refused with the
setting to change. Torch-free, so Snakemake plans quickly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from unet_pipeline.errors import ConfigError
from unet_pipeline.geometry import STRIP_WIDTH_PX, BlockGrid, UNetConfig, clip_chunks, parts_for, pyramid, \
    shard_shape, tta_transforms

MB = 1e6
FRAMEWORK_MB = 500          # Python, NumPy, zarr, dask in a CPU job
TORCH_FRAMEWORK_MB = 2000   # torch and, on a GPU node, the CUDA libraries (about 250 MB measured on a CPU)
START_MINUTES = 10          # queueing a job's start-up, imports, opening stores
MARGIN = 1.5                # on the runtime at the configured throughput
# Strips the prediction's reader keeps ahead of the network: enough to hide a read behind it.
READ_AHEAD = 2


def predict_buffer_bytes(shape, itemsize: int, block, margin: int, tile: int, writers: int, out_itemsize: int) -> int:
    """Upper estimate of the host memory a predict job's buffers take, framework excluded.

    A strip spans at most STRIP_WIDTH_PX of the slice width and one block row
    (plus the context margin and a tile of rounding); its raw rows are read
    across the whole width in whole block rows (a chunk is decoded once, a
    shard whole), up to two block rows kept and held twice while the next are
    appended; READ_AHEAD + 1 float32 regions of a strip
    are in flight; blocks (at most one shard each) are held as float32
    buffers (one being filled, a few spare) and as 2 x writers encoded copies.
    Memory never grows with the number of slices or rows; with the width only
    through the raw rows (one byte per voxel for 8-bit EM).
    """
    height = block[1] + 2 * margin + tile
    width = min(shape[2], max(STRIP_WIDTH_PX, block[2])) + 2 * margin + tile
    region = block[0] * height * width * 4
    rows = 2 * block[0] * (block[1] + height) * shape[2] * itemsize
    voxels = math.prod(block)
    return (READ_AHEAD + 1) * region + rows + 4 * voxels * 4 + 2 * writers * voxels * out_itemsize


@dataclass(frozen=True)
class Job:
    """One job's requests: what SLURM is asked for."""

    threads: int
    mem_mb: int
    runtime: int  # minutes


@dataclass
class StagePlan:
    """A block-wise stage of one dataset: its parts and what each part asks for."""

    parts: int
    job: Job
    strips: int
    voxels: int


@dataclass
class StorePlan:
    """One store: level-0 parts, the pyramid levels split across jobs, and the finishing job."""

    write: StagePlan
    pyramid_parts: list[int] = field(default_factory=list)   # parts of levels 1, 2, ... that have jobs
    pyramid_job: Job | None = None
    finish: Job | None = None
    levels: int = 1


def _runtime(voxels: float, mvoxel_per_s: float) -> int:
    return START_MINUTES + math.ceil(MARGIN * voxels / (mvoxel_per_s * MB) / 60)


def _parts(setting, voxels: int, mvoxel_per_s: float, job_minutes: float, strips: int) -> int:
    if setting != "auto":
        return max(1, min(int(setting), strips))
    return parts_for(voxels, mvoxel_per_s * MB * job_minutes * 60, strips)


class Planner:
    """Plans one dataset's block-wise stages from its shape and the config."""

    def __init__(self, config: dict, shape, raw_itemsize: int = 1):
        self.config = config
        self.shape = tuple(int(s) for s in shape)
        self.voxels = int(np.prod(self.shape))
        self.raw_itemsize = raw_itemsize
        cluster = config["cluster"]
        self.speed = cluster["throughput_mvoxel_per_s"]
        self.job_minutes = cluster["job_minutes"]
        self.cpu_threads = cluster["cpu_job_cpus"]
        self.gpu_threads = cluster["gpu_job_cpus"]
        self.max_minutes = cluster["max_job_minutes"]
        self.max_mem = cluster["max_job_mem_mb"]

    # -- layout
    def grid(self, section: str) -> BlockGrid:
        """The block grid of a store laid out by the config section (`preprocess` or `predict`)."""
        layout = self.config[section]
        chunks = clip_chunks(layout["chunks"], self.shape)
        return BlockGrid(self.shape, shard_shape(self.shape, chunks, layout["chunks_per_file"]))

    def _strips(self, grid: BlockGrid, z_align: int = 1) -> int:
        return len(grid.strips(z_align, STRIP_WIDTH_PX))

    def _check(self, what: str, job: Job, parts_key: str | None) -> Job:
        if job.runtime > self.max_minutes:
            remedy = f"raise {parts_key} (or set it to auto)" if parts_key else "lower cluster.job_minutes"
            raise ConfigError(
                f"{what}: one job would need {job.runtime} min, more than cluster.max_job_minutes "
                f"({self.max_minutes:g}); {remedy}")
        if job.mem_mb > self.max_mem:
            raise ConfigError(
                f"{what}: one job would need {job.mem_mb} MB, more than cluster.max_job_mem_mb ({self.max_mem}); "
                "use smaller chunks_per_file (smaller blocks) or narrower strips")
        return job

    def _stage(self, what: str, parts_key: str, setting, grid: BlockGrid, speed: float, threads: int,
               mem_bytes: float, framework_mb: int = FRAMEWORK_MB, z_align: int = 1) -> StagePlan:
        strips = self._strips(grid, z_align)
        parts = _parts(setting, self.voxels, speed, self.job_minutes, strips)
        job = Job(threads, framework_mb + math.ceil(MARGIN * mem_bytes / MB),
                  _runtime(math.ceil(self.voxels / parts), speed))
        return StagePlan(parts, self._check(what, job, parts_key), strips, self.voxels)

    def _strip_bytes(self, grid: BlockGrid, itemsize: int) -> float:
        width = min(self.shape[2], max(STRIP_WIDTH_PX, grid.block[2]))
        return grid.block[0] * grid.block[1] * width * itemsize

    # -- stages
    def preprocess(self, itemsize: int, what: str) -> StagePlan:
        """The parts that copy a stack of `itemsize` bytes per voxel into its store."""
        grid = self.grid("preprocess")
        block = math.prod(grid.block)
        # two strips in flight, each block copied once more, per thread a block's statistics in float64 pieces
        mem = 2 * self._strip_bytes(grid, itemsize) * 2 + self.cpu_threads * (block * itemsize + 64 * MB)
        return self._stage(what, "preprocess.parts", self.config["preprocess"]["parts"], grid,
                           self.speed["preprocess"], self.cpu_threads, mem)

    def predict(self) -> StagePlan:
        """The prediction's parts (GPU jobs)."""
        pred = self.config["predict"]
        grid = self.grid("predict")
        margin = UNetConfig(**self.config["model"]).context_margin
        mem = predict_buffer_bytes(self.shape, self.raw_itemsize, grid.block, margin, pred["tile_size"], pred["writers"],
                           np.dtype(pred["dtype"]).itemsize)
        speed = self.speed["predict"] / len(tta_transforms(pred["tta"]))
        return self._stage("predict", "predict.parts", pred["parts"], grid, speed, self.gpu_threads, mem,
                           TORCH_FRAMEWORK_MB, z_align=self.config["preprocess"]["chunks"][0])

    def segment(self) -> StagePlan:
        """The segmentation's label and relabel parts (a watershed block reads a halo around it)."""
        grid = self.grid("predict")  # the segmentation keeps the probability map's layout
        # per thread: as if a whole block and the watershed's largest halo were held at once (probabilities as
        # float64, the foreground, int64 keys and labels, scipy's scratch); the watershed works in 1024^2 tiles
        # with that halo, so this is an upper bound (4.3 GB benchmark: 929 MB peak against 1067 MB planned)
        halo = 2 * self.config["segment"]["watershed"]["max_halo_px"]
        mem = self.cpu_threads * 40 * grid.block[0] * (grid.block[1] + halo) * (grid.block[2] + halo)
        speed = self.speed["segment" if self.config["segment"]["method"] == "threshold" else "watershed"]
        return self._stage("segment", "segment.parts", self.config["segment"]["parts"], grid, speed,
                           self.cpu_threads, mem)

    def _face_voxels(self) -> int:
        """Voxels on the segmentation's block faces: what the join reads, and bounds the ids it hands on."""
        grid = self.grid("predict")
        return sum(self.voxels // self.shape[a] for a in (1, 2)) * 2 * max(1, grid.grid_shape[1])

    def join(self) -> Job:
        """The one job that joins labels across block faces: memory grows with the faces, not the voxels."""
        face_voxels = self._face_voxels()
        return self._check("segment join", Job(1, FRAMEWORK_MB + math.ceil(2 * face_voxels / MB),
                                               START_MINUTES + math.ceil(face_voxels / (50 * MB) / 60)),
                           None)

    def relabel(self, label: StagePlan) -> Job:
        """A relabel part: the blocks of one label part again, each looked up and written, at relabelling speed.

        No halo and no watershed: per thread a block of local ids, its final
        ids and its compressed bytes (uint32 each), beside the join's id
        tables, which every part loads (as large as the join plans them).
        """
        block = math.prod(self.grid("predict").block)
        mem = self.cpu_threads * 3 * 4 * block + 2 * self._face_voxels()
        job = Job(self.cpu_threads, FRAMEWORK_MB + math.ceil(MARGIN * mem / MB),
                  _runtime(math.ceil(self.voxels / label.parts), self.speed["segment"]))
        return self._check("segment relabel", job, "segment.parts")

    def store(self, section: str, write: StagePlan, itemsize: int, what: str) -> StorePlan:
        """Level 0 as planned, then the pyramid: levels of more than one job's work get jobs, the rest the finisher."""
        layout = self.config[section]
        setting = self.config["pyramid"]["levels"]
        levels = pyramid(self.shape, clip_chunks(layout["chunks"], self.shape), self._voxel_size(),
                         None if setting == "auto" else int(setting))
        plan = StorePlan(write, levels=len(levels))
        speed = self.speed["pyramid"]
        remaining, longest = 0, 0
        for below, level in zip(levels, levels[1:]):
            work = int(np.prod(below.shape))  # a level reads every voxel of the level below
            grid = BlockGrid(level.shape, shard_shape(level.shape, clip_chunks(layout["chunks"], level.shape),
                                                      layout["chunks_per_file"]))
            parts = parts_for(work, speed * MB * self.job_minutes * 60, self._strips(grid))
            if parts > 1 and not remaining:
                plan.pyramid_parts.append(parts)
                longest = max(longest, math.ceil(work / parts))
            else:
                remaining += work
        block = math.prod(self.grid(section).block)
        per_thread = 8 * block * itemsize + 2 * block * 4  # the region below, and the float32 mean
        if plan.pyramid_parts:
            plan.pyramid_job = self._check(
                f"{what} pyramid", Job(self.cpu_threads, FRAMEWORK_MB + math.ceil(MARGIN * self.cpu_threads *
                                                                                   per_thread / MB),
                                       _runtime(longest, speed)), None)
        plan.finish = self._check(
            f"{what} finish", Job(self.cpu_threads, FRAMEWORK_MB + math.ceil(MARGIN * self.cpu_threads * per_thread
                                                                             / MB) + 200,
                                  _runtime(remaining, speed)), None)
        return plan

    def _voxel_size(self) -> list[float]:
        """For planning the levels: the configured voxel size, or isotropic in y/x and 10x in z when `auto`.

        The exact schedule of z downsampling is set when the store is written,
        from the stack's real voxel size; the planned number of jobs does not
        depend on it at the levels that have jobs (y/x are halved at every level).
        """
        configured = self.config["preprocess"]["voxel_size_nm"]
        return [10.0, 1.0, 1.0] if configured == "auto" else [float(v) for v in configured]


@dataclass
class DatasetPlan:
    """Every block-wise job of one dataset: the stores it writes and the jobs that write them."""

    raw: StorePlan
    labels: StorePlan | None = None
    weights: Job | None = None
    probabilities: StorePlan | None = None
    segmentation: StorePlan | None = None  # its write parts label; relabel parts cover the same blocks
    join: Job | None = None
    relabel: Job | None = None


def _itemsize(config: dict, path: str) -> int:
    """Bytes per voxel of a stack (synthetic stacks are 8-bit)."""
    for spec_name in config.get("synthetic", {}):
        if path.startswith(f"{config['results_dir']}/synthetic/{spec_name}/"):
            return 1
    from unet_pipeline import sources

    return sources.header(path).dtype.itemsize


def dataset_plan(config: dict, name: str, shape, predicted: bool) -> DatasetPlan:
    """The plan of one dataset's stores, from its shape; ConfigError if a job would exceed the site's limits."""
    dataset = config["datasets"][name]
    itemsize = _itemsize(config, dataset["raw"])
    planner = Planner(config, shape, itemsize)
    plan = DatasetPlan(raw=planner.store("preprocess", planner.preprocess(itemsize, f"{name} preprocess"),
                                         itemsize, f"{name} raw"))
    if "labels" in dataset:
        size = 1 if dataset["label_format"] == "binary" else 4
        plan.labels = planner.store("preprocess", planner.preprocess(_itemsize(config, dataset["labels"]),
                                                                     f"{name} labels"), size, f"{name} labels")
        # weights: one job, a slice of labels and float64 distance maps at a time
        slice_voxels = shape[1] * shape[2]
        plan.weights = Job(1, FRAMEWORK_MB + math.ceil(MARGIN * 48 * slice_voxels / MB),
                           _runtime(planner.voxels, 2.0))
    if predicted:
        out_itemsize = np.dtype(config["predict"]["dtype"]).itemsize
        plan.probabilities = planner.store("predict", planner.predict(), out_itemsize, f"{name} probabilities")
        plan.segmentation = planner.store("predict", planner.segment(), 4, f"{name} segmentation")
        plan.join = planner.join()
        plan.relabel = planner.relabel(plan.segmentation.write)
    return plan
