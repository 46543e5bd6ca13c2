# Values derived from the validated config, the plan of every dataset's jobs, and input functions.
import json
import math
import os
import shlex

from unet_pipeline import stages
from unet_pipeline.config import has_slices, parse_slices
from unet_pipeline.errors import ConfigError
from unet_pipeline.resources import Planner, dataset_plan

R = config["results_dir"]
DATASETS = config["datasets"]
UNET = stages.command()  # this interpreter's `-m unet_pipeline`: no PATH lookup

LABELLED = [n for n, d in DATASETS.items() if "labels" in d]
TRAINING = stages.training_datasets(config)
PREDICTED = [n for n, d in DATASETS.items() if d.get("predict", True)]
EVALUATED = [n for n in PREDICTED if n in LABELLED and has_slices(DATASETS[n].get("test"))]
BLOCKWISE_STORES = ("raw", "labels", "probabilities", "segmentation")

CLUSTER = config["cluster"]
GPU_JOB_CPUS = CLUSTER["gpu_job_cpus"]
CPU_JOB_CPUS = CLUSTER["cpu_job_cpus"]

# Parts, memory and walltime of every job, from each stack's shape (read from its header).
try:
    PLANS = {name: dataset_plan(config, name, SHAPES[name], name in PREDICTED) for name in DATASETS}
except ConfigError as exc:
    sys.exit(f"unet-pipeline: cannot plan the jobs: {exc}")


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    name=r"[A-Za-z0-9_.-]+",
    store="|".join(BLOCKWISE_STORES),
    part=r"\d+-of-\d+",
    level=r"\d+",


def logged(command):
    """`command` with its output in the rule's log; on failure the log's last lines reach the terminal.

    Stages write one sentence for a user error (CLI exit status 2): without
    this, a user would see only Snakemake's "non-zero exit status" block.
    """
    return f"{command} > {{log:q}} 2>&1 || {{{{ status=$?; tail -n 5 {{log:q}} >&2; exit $status; }}}}"


def raw_source(wildcards):
    return DATASETS[wildcards.dataset]["raw"]


def labels_source(wildcards):
    return DATASETS[wildcards.dataset]["labels"]


def store_path(dataset, store):
    return f"{R}/{dataset}/{store}.ome.zarr"


def report_example():
    return config["report"].get("dataset") or (EVALUATED or PREDICTED)[0]


def gpu_count():
    """GPUs a GPU job asks for: train may use several (data parallel), predict parts one."""
    return max(1, int(config["train"].get("gpus", 1)))


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


def validation_px():
    """Pixels of all validation slices (what the calibrate job predicts and segments in memory)."""
    return sum(len(parse_slices(config["datasets"][n].get("validate"), SHAPES[n][0], n)) * SHAPES[n][1] * SHAPES[n][2]
               for n in TRAINING)


def calibrate_mem_mb():
    """The network and its tiles (~3 GB), and ~120 bytes a validation pixel: image, probabilities, candidates."""
    return 3000 + math.ceil(validation_px() * 120 / 1e6)


def calibrate_runtime_min():
    """Prediction and every candidate setting, each segmented and scored, at the configured watershed speed."""
    from unet_pipeline.calibrate import CANDIDATES  # numba: imported only when the job is planned

    seconds = validation_px() * CANDIDATES / (CLUSTER["throughput_mvoxel_per_s"]["watershed"] * 1e6)
    return 10 + math.ceil(1.5 * seconds / 60)


# --------------------------------------------------------------------------- block-wise stores
def store_plan(wildcards):
    return getattr(PLANS[wildcards.dataset], wildcards.store)


def markers(dataset, store, step, count):
    """The summaries a step's jobs write (temporary: they mark that the jobs ran).

    Named "<step>-<i>-of-<count>", so that the part count is in the file name
    and not in the jobs' params: a new count (a throughput or `parts` changed
    on a finished run) then changes no recorded params, and with the profiles'
    rerun triggers (no `input`) reruns nothing, since the stores are the same
    for any count. A run interrupted before its store was published finishes
    with the new count, each part resuming from the blocks already written.
    """
    return [f"{R}/{dataset}/.parts/{store}/{step}-{i}-of-{count}.json" for i in range(count)]


def part_arg(wildcards):
    """The CLI's --part (i/count) of a job's `part` wildcard (i-of-count)."""
    return wildcards.part.replace("-of-", "/")


def write_markers(dataset, store):
    """Level 0's jobs: the parts of the stage that writes the store."""
    plan = getattr(PLANS[dataset], store)
    return markers(dataset, store, "write", plan.write.parts)


def level_markers(dataset, store, level):
    """Jobs of pyramid level `level` (level 0: the stage's own parts)."""
    plan = getattr(PLANS[dataset], store)
    if level == 0:
        return write_markers(dataset, store)
    return markers(dataset, store, f"level{level}", plan.pyramid_parts[level - 1])


def job(wildcards, what: str):
    """The requests (threads, mem_mb, runtime) of one job kind of a dataset's plan."""
    return PLANS[wildcards.dataset].job(what)


def finish_upstream(wildcards):
    """The real files a store derives from: newer ones rerun it (its parts' summaries are temporary)."""
    d = wildcards.dataset
    return {
        "raw": [DATASETS[d]["raw"]],
        "labels": [DATASETS[d]["raw"], DATASETS[d].get("labels", "")],
        "probabilities": [store_path(d, "raw"), f"{R}/model/model.pt"],
        "segmentation": [store_path(d, "probabilities"), f"{R}/model/segmentation.json"],
    }[wildcards.store]


def finish_markers(wildcards):
    plan = store_plan(wildcards)
    return level_markers(wildcards.dataset, wildcards.store, len(plan.pyramid_parts))
