# Input functions and values derived from the validated config.
import json
import math
import os

R = config["results_dir"]
DATASETS = config["datasets"]


def has_slices(ds, key):
    return ds.get(key) not in (None, [], "none")


LABELLED = [n for n, d in DATASETS.items() if "labels" in d]
TRAINING = [n for n, d in DATASETS.items() if has_slices(d, "train") or has_slices(d, "validate")]
PREDICTED = [n for n, d in DATASETS.items() if d.get("predict", True)]
EVALUATED = [n for n in PREDICTED if n in LABELLED and has_slices(DATASETS[n], "test")]
SHARDS = config["predict"]["shards"]


def raw_source(wildcards):
    return DATASETS[wildcards.dataset]["raw"]


def labels_source(wildcards):
    return DATASETS[wildcards.dataset]["labels"]


def training_datasets_json():
    """The train CLI's --datasets argument: every dataset with train/validate slices."""
    return json.dumps([
        {
            "name": n,
            "raw": f"{R}/{n}/raw.ome.zarr",
            "labels": f"{R}/{n}/labels.ome.zarr",
            "weights": f"{R}/{n}/weights.ome.zarr",
            "train": DATASETS[n].get("train"),
            "validate": DATASETS[n].get("validate"),
        }
        for n in TRAINING
    ])


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


def predict_mem_mb(wildcards):
    """Host memory of a predict job: a few chunks in flight plus the framework (about 400 MB measured).

    A callable resource: evaluated when a job is scheduled, so importing the
    model (and torch) does not slow down every start of Snakemake.
    """
    from unet_pipeline.model import UNetConfig

    margin = 2 * UNetConfig(**config["model"]).context_margin
    z, y, x = config["predict"]["chunks"]
    region = z * (y + margin) * (x + margin)
    return 2000 + math.ceil(4 * (z * y * x * 4 + region * 8) / 1e6)
