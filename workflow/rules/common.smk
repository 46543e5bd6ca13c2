# Input functions and values derived from the validated config.
import json

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


def train_runtime_min():
    # About 0.15 s per step for the small CPU default, far less per step on a GPU;
    # a generous ceiling that scales with the requested steps.
    return max(30, int(config["train"]["steps"] * 0.01) + 30)
