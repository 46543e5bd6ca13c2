# Input functions and values derived from the validated config.
import json
import math
import os

from unet_pipeline import stages

R = config["results_dir"]
DATASETS = config["datasets"]


LABELLED = [n for n, d in DATASETS.items() if "labels" in d]
TRAINING = stages.training_datasets(config)
PREDICTED = [n for n, d in DATASETS.items() if d.get("predict", True)]
EVALUATED = [n for n in PREDICTED if n in LABELLED and stages.has_slices(DATASETS[n], "test")]
SHARDS = config["predict"]["shards"]


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    name=r"[A-Za-z0-9_.-]+",
    shard=r"\d+",


def logged(command):
    """`command` with its output in the rule's log; on failure the log's last lines reach the terminal.

    Stages write one sentence for a user error (CLI exit status 2): without
    this, a user would see only Snakemake's "non-zero exit status" block.
    """
    return f"{command} > {{log}} 2>&1 || {{{{ status=$?; tail -n 5 {{log}} >&2; exit $status; }}}}"


def raw_source(wildcards):
    return DATASETS[wildcards.dataset]["raw"]


def labels_source(wildcards):
    return DATASETS[wildcards.dataset]["labels"]


def report_example():
    name = config["report"].get("dataset") or (EVALUATED or PREDICTED)[0]
    return name


def gpu_count():
    """GPUs a GPU job asks for: train may use several (data parallel), predict shards one."""
    return max(1, int(config["train"].get("gpus", 1)))


CLUSTER = config["cluster"]
GPU_JOB_CPUS = CLUSTER["gpu_job_cpus"]


def cluster_resources(gpu: bool) -> dict:
    """SLURM placement of a job, from the config (or environment): one place for a site to edit.

    Local runs ignore these resources; the SLURM executor turns them into
    --partition, --account and --gpus options.
    """
    key = "gpu_partition" if gpu else "cpu_partition"
    res = {}
    partition = os.environ.get(f"UNET_SLURM_{key.upper()}") or CLUSTER[key]
    if partition:
        res["slurm_partition"] = partition
    account = os.environ.get("UNET_SLURM_ACCOUNT") or CLUSTER["account"]
    if account:
        res["slurm_account"] = account
    if gpu and CLUSTER["gpu_model"]:
        res["gpu_model"] = CLUSTER["gpu_model"]
    return res


def train_runtime_min():
    """Walltime request: steps at the configured speed, plus validation and a 50% margin."""
    steps = config["train"]["steps"]
    return 10 + math.ceil(1.5 * steps / CLUSTER["train_steps_per_s"] / 60)


DRY_RUN_RUNTIME_MIN = 60  # the profiles' default runtime


def predict_runtime_min(wildcards, input):
    """Walltime of one shard: its share of the volume at the configured throughput, 50% margin."""
    import zarr

    from unet_pipeline.inference import tta_transforms

    if not os.path.exists(input.raw):
        # Snakemake evaluates resources when a job is ready to run, after its input
        # exists; only a dry run (-n) asks earlier, and it just prints the number.
        return DRY_RUN_RUNTIME_MIN
    shape = zarr.open_group(str(input.raw), mode="r")["0"].shape
    voxels = math.prod(shape) / SHARDS
    passes = len(tta_transforms(config["predict"]["tta"]))
    return 10 + math.ceil(1.5 * voxels * passes / (CLUSTER["predict_mvoxel_per_s"] * 1e6) / 60)


def predict_mem_mb(wildcards, input):
    """Host memory of a predict job: its buffers (`predict.buffer_bytes`) with a 50% margin, plus 2 GB
    for the framework (torch and the CUDA libraries; about 250 MB measured on a CPU).

    A callable resource: evaluated when a job is ready to run, once the raw
    image exists (its width and block size set the buffers); a dry run before
    that assumes one 4096^2 slice of uint8.
    """
    import zarr

    from unet_pipeline.io import shard_shape
    from unet_pipeline.model import UNetConfig
    from unet_pipeline.predict import buffer_bytes

    pred = config["predict"]
    shape, itemsize = (1, 4096, 4096), 1
    if os.path.exists(input.raw):
        level0 = zarr.open_group(str(input.raw), mode="r")["0"]
        shape, itemsize = level0.shape, level0.dtype.itemsize
    chunks = [min(c, s) for c, s in zip(pred["chunks"], shape)]
    block = shard_shape(shape, chunks, pred["chunks_per_file"]) or chunks
    out_itemsize = {"uint8": 1, "float16": 2, "float32": 4}[pred["dtype"]]
    margin = UNetConfig(**config["model"]).context_margin
    need = buffer_bytes(shape, itemsize, block, margin, pred["tile_size"], pred["writers"], out_itemsize)
    return 2000 + math.ceil(1.5 * need / 1e6)
