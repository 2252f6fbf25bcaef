"""drizzle3d: combine SPHEREx spectral images into calibrated spectral cubes.

The core is :class:`Drizzle3D`, a stateful 3-D drizzle modelled on STScI
drizzle's ``Drizzle``: images are added one at a time, each input pixel's flux
is spread over the output voxels it overlaps in space and wavelength, and the
result is exposed as labelled :mod:`xarray` cubes.
"""

from importlib.metadata import PackageNotFoundError, version

from drizzle3d.archive import ArchiveError, FetchResult, fetch, query_spherex
from drizzle3d.blot import Exposure, blot_cube, find_outliers
from drizzle3d.config import Drizzle3DConfig
from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.io import load_cube, load_state, save_cube, save_state
from drizzle3d.pipeline import drizzle, drizzle_files, drizzle_tiled, extract_spectrum, file_hash
from drizzle3d.pixmap import BBox, calc_pixmap, estimate_pixel_scale_ratio, footprint_bbox
from drizzle3d.resample import SUPPORTED_KERNELS, Drizzle3D, decode_context
from drizzle3d.simulate import (
    ExtendedSource,
    Line,
    PointSource,
    Sky,
    Spectrum,
    make_cutout,
    simulate_field,
    write_exposure,
)
from drizzle3d.spherex import (
    DEFAULT_EXCLUDE_FLAGS,
    ImageHeader,
    SpherexFileError,
    SpherexImage,
    fit_zodi_scale,
    flag_bits,
    read_header_wcs,
    read_spherex,
    spectral_wavemap,
)

try:
    __version__ = version("drizzle3d")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_EXCLUDE_FLAGS",
    "SUPPORTED_KERNELS",
    "ArchiveError",
    "BBox",
    "Drizzle3D",
    "Drizzle3DConfig",
    "Exposure",
    "ExtendedSource",
    "FetchResult",
    "ImageHeader",
    "Line",
    "OutputGrid",
    "PointSource",
    "Sky",
    "SpatialGrid",
    "SpectralGrid",
    "Spectrum",
    "SpherexFileError",
    "SpherexImage",
    "__version__",
    "blot_cube",
    "calc_pixmap",
    "decode_context",
    "drizzle",
    "drizzle_files",
    "drizzle_tiled",
    "estimate_pixel_scale_ratio",
    "extract_spectrum",
    "fetch",
    "file_hash",
    "find_outliers",
    "fit_zodi_scale",
    "flag_bits",
    "footprint_bbox",
    "load_cube",
    "load_state",
    "make_cutout",
    "query_spherex",
    "read_header_wcs",
    "read_spherex",
    "save_cube",
    "save_state",
    "simulate_field",
    "spectral_wavemap",
    "write_exposure",
]
