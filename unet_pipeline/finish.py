"""The finishing job of a block-wise stage: check every block, build the coarse levels, publish the store.

One generic step for every store the workflow writes in parts (raw, labels,
probabilities, segmentation): it refuses a store with any unrecorded block
(naming how many and what to rerun), builds the pyramid levels that were not
split across jobs (the small, coarse ones), adds what only the whole store
determines (the stage's own `finish_*`: statistics, fingerprint, cell
count), writes the NGFF metadata that makes viewers show it, marks it
complete and renames it into place. Until then the store has a hidden name
and no NGFF metadata, so no viewer or later stage sees a half-written output.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from unet_pipeline import stores
from unet_pipeline.blockwise import PartialStore
from unet_pipeline.pyramid import build_levels, levels_of

log = logging.getLogger(__name__)

# kind -> (module, function) computing the finished store's attributes from its blocks' records;
# imported when needed, so finishing a raw store does not load torch.
FINISHERS = {
    "raw": ("unet_pipeline.preprocess", "finish_raw"),
    "labels": ("unet_pipeline.preprocess", "finish_labels"),
    "probabilities": ("unet_pipeline.predict", "finish_probabilities"),
    "segmentation": ("unet_pipeline.segment", "finish_segmentation"),
    "weights": ("unet_pipeline.weights", "finish_weights"),
}


def finish_store(store: PartialStore, first_unbuilt_level: int, threads: int) -> Path:
    """Publish `store`: levels below `first_unbuilt_level` were written by jobs, the rest are built here."""
    partial = dict(store.group("r").attrs["partial"])
    remedy = f"rerun the jobs that write {store.final}"
    records = store.require_complete("0", remedy)
    for level in range(1, min(first_unbuilt_level, len(levels_of(store)))):
        store.require_complete(str(level), remedy)
    build_levels(store, max(1, first_unbuilt_level), threads)
    module, function = FINISHERS[partial["kind"]]
    attrs = getattr(importlib.import_module(module), function)(store, records)
    levels = levels_of(store)
    stores.write_ngff(store.group(), levels, partial["voxel_size"], partial["name"], partial.get("label_source"))
    final = store.publish({**attrs, "levels": len(levels)})
    if partial.get("label_source"):
        stores.mark_results_folder(final)
    log.info("%s: complete (%d pyramid levels below level 0)", final, len(levels) - 1)
    return final


def finish_from_marker(marker: str, first_unbuilt_level: int, threads: int) -> Path:
    """The workflow's finishing job: the store is the one the parts' marker names."""
    return finish_store(PartialStore.from_marker(marker), first_unbuilt_level, threads)


