"""The prediction reader's normalisation as one compiled pass (see `preprocess.Normaliser.into`).

A module of its own so that numba (about 100 MB and a few tenths of a second
to import) is not loaded by the stages that never normalise strips, such as
preprocess; predict on a CPU loads it on its first strip.
"""
import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def normalise_3d(raw, out, low, scale):
    """out = (float32(raw) - low) * scale, voxel by voxel, for 3D arrays of any strides."""
    for z in range(raw.shape[0]):
        for y in range(raw.shape[1]):
            for x in range(raw.shape[2]):
                out[z, y, x] = (np.float32(raw[z, y, x]) - low) * scale
