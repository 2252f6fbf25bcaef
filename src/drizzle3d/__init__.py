"""drizzle3d: combine SPHEREx spectral images into calibrated spectral cubes.

The core is :class:`Drizzle3D`, a stateful 3-D drizzle modelled on STScI
drizzle's ``Drizzle``: images are added one at a time, each input pixel's flux
is spread over the output voxels it overlaps in space and wavelength, and the
result is exposed as labelled :mod:`xarray` cubes.
"""

from importlib.metadata import PackageNotFoundError, version

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.resample import SUPPORTED_KERNELS, Drizzle3D, decode_context

try:
    __version__ = version("drizzle3d")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "SUPPORTED_KERNELS",
    "Drizzle3D",
    "OutputGrid",
    "SpatialGrid",
    "SpectralGrid",
    "__version__",
    "decode_context",
]
