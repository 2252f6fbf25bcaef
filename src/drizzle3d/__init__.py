"""drizzle3d: combine SPHEREx spectral images into calibrated spectral cubes.

The core is :class:`Drizzle3D`, a stateful 3-D drizzle modelled on STScI
drizzle's ``Drizzle``: images are added one at a time, each input pixel's flux
is spread over the output voxels it overlaps in space and wavelength, and the
result is exposed as labelled :mod:`xarray` cubes.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

# Public names -> the submodule that defines them. Submodules are imported on first
# use (PEP 562), so ``import drizzle3d`` stays light and e.g. the pipeline does not
# load the archive client, the simulator or xarray until they are needed.
_LAZY = {
    "ArchiveError": "archive",
    "FetchResult": "archive",
    "fetch": "archive",
    "query_spherex": "archive",
    "Exposure": "blot",
    "blot_cube": "blot",
    "find_outliers": "blot",
    "Drizzle3DConfig": "config",
    "OutputGrid": "grid",
    "SpatialGrid": "grid",
    "SpectralGrid": "grid",
    "load_cube": "io",
    "load_state": "io",
    "save_cube": "io",
    "save_state": "io",
    "drizzle": "pipeline",
    "drizzle_files": "pipeline",
    "drizzle_tiled": "pipeline",
    "extract_spectrum": "pipeline",
    "file_hash": "pipeline",
    "BBox": "pixmap",
    "calc_pixmap": "pixmap",
    "estimate_pixel_scale_ratio": "pixmap",
    "footprint_bbox": "pixmap",
    "SUPPORTED_KERNELS": "resample",
    "Drizzle3D": "resample",
    "decode_context": "resample",
    "ExtendedSource": "simulate",
    "Line": "simulate",
    "PointSource": "simulate",
    "Sky": "simulate",
    "Spectrum": "simulate",
    "make_cutout": "simulate",
    "simulate_field": "simulate",
    "write_exposure": "simulate",
    "DEFAULT_EXCLUDE_FLAGS": "spherex",
    "ImageHeader": "spherex",
    "SpherexFileError": "spherex",
    "SpherexImage": "spherex",
    "fit_zodi_scale": "spherex",
    "flag_bits": "spherex",
    "read_header_wcs": "spherex",
    "read_spherex": "spherex",
    "spectral_wavemap": "spherex",
}

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


def __getattr__(name):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'drizzle3d' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"drizzle3d.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
