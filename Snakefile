# unet-pipeline: the U-Net of Ronneberger et al. (2015) for EM volumes far larger than memory.
# Stages: synth -> preprocess -> weights -> train -> predict -> segment -> evaluate -> report.
# Every stage whose work grows with the volume runs as parts (jobs) over blocks of its output,
# then a finishing job checks and publishes the store (workflow/rules/blockwise.smk).
# config/README.md documents the keys.
import sys

from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the default; a --configfile on the command line replaces
# it (instead of being merged into it) so that its datasets stand alone.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


from unet_pipeline.config import check_sources, validate_config
from unet_pipeline.errors import ConfigError

try:
    config = validate_config(config)
    SHAPES = check_sources(config)  # every stack's header: missing files and bad slices stop here
except ConfigError as exc:
    sys.exit(f"unet-pipeline: invalid configuration: {exc}")


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/blockwise.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    input:
        report=f"{R}/report/report.md",
        segmentations=expand(f"{R}/{{dataset}}/segmentation.ome.zarr", dataset=PREDICTED),


onsuccess:
    print(
        f"\nunet-pipeline finished.\n  outputs: {R}/<dataset>/ (raw, probabilities, segmentation as OME-Zarr)"
        f"\n  model:   {R}/model/model.pt\n  report:  {R}/report/report.md\n"
    )
