"""Output grids: a celestial pixel grid plus wavelength bin edges.

An :class:`OutputGrid` is what :class:`drizzle3d.Drizzle3D` drizzles onto: a
:class:`SpatialGrid` (a 2-D celestial WCS and its ``(ny, nx)`` shape) and a
:class:`SpectralGrid` (``nz + 1`` increasing wavelength bin edges in micron).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OutputGrid", "SpatialGrid", "SpectralGrid"]


def _as_edges(edges) -> np.ndarray:
    arr = np.array(edges, dtype=np.float64, copy=True)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(
            f"'edges' must be a 1-D sequence of at least 2 wavelengths (um); got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("'edges' must be finite.")
    if not np.all(np.diff(arr) > 0):
        raise ValueError("'edges' must be strictly increasing.")
    if arr[0] <= 0:
        raise ValueError(f"'edges' must be positive wavelengths in um; got {arr[0]!r}.")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class SpectralGrid:
    """Wavelength bin edges of a cube, in micron.

    Parameters
    ----------
    edges : array_like
        ``nz + 1`` strictly increasing, positive wavelengths (um).
    """

    edges: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "edges", _as_edges(self.edges))

    @classmethod
    def from_edges(cls, edges) -> SpectralGrid:
        """Build a grid from explicit bin edges (um)."""
        return cls(edges)

    @property
    def nz(self) -> int:
        """Number of wavelength bins."""
        return self.edges.size - 1

    @property
    def centers(self) -> np.ndarray:
        """Bin centres (um), the arithmetic mean of each bin's edges."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    @property
    def widths(self) -> np.ndarray:
        """Bin widths (um)."""
        return np.diff(self.edges)

    def __eq__(self, other):
        if not isinstance(other, SpectralGrid):
            return NotImplemented
        return np.array_equal(self.edges, other.edges)

    __hash__ = None


@dataclass(frozen=True, eq=False)
class SpatialGrid:
    """A celestial pixel grid: a 2-D WCS and its ``(ny, nx)`` shape.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the output pixels (0-based pixel convention as in
        astropy's ``*_values`` methods).
    shape : tuple of int
        ``(ny, nx)``.
    """

    wcs: object
    shape: tuple

    def __post_init__(self):
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"'shape' must be (ny, nx) with positive sizes; got {self.shape!r}.")
        object.__setattr__(self, "shape", shape)
        naxis = getattr(self.wcs, "pixel_n_dim", None)
        if naxis != 2:
            raise TypeError(f"'wcs' must be a 2-D celestial WCS; got {type(self.wcs).__name__}.")

    @classmethod
    def from_wcs(cls, wcs, shape) -> SpatialGrid:
        """Build a grid from an existing celestial WCS and ``(ny, nx)``."""
        return cls(wcs, shape)

    def world_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ra, dec)`` in degrees at every pixel centre, each of shape ``(ny, nx)``."""
        ny, nx = self.shape
        y, x = np.mgrid[0:ny, 0:nx]
        ra, dec = self.wcs.pixel_to_world_values(x.astype(float), y.astype(float))
        return np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)

    def header_string(self) -> str:
        """The WCS as a FITS header string (for metadata)."""
        return self.wcs.to_header_string(relax=True)

    def __eq__(self, other):
        if not isinstance(other, SpatialGrid):
            return NotImplemented
        return self.shape == other.shape and self.wcs.wcs.compare(other.wcs.wcs)

    __hash__ = None


@dataclass(frozen=True, eq=False)
class OutputGrid:
    """The output cube grid: spatial pixels times wavelength bins.

    Parameters
    ----------
    spatial : SpatialGrid
        Celestial pixel grid.
    spectral : SpectralGrid
        Wavelength bin edges (um).
    """

    spatial: SpatialGrid
    spectral: SpectralGrid

    def __post_init__(self):
        if not isinstance(self.spatial, SpatialGrid):
            raise TypeError(f"'spatial' must be a SpatialGrid; got {type(self.spatial).__name__}.")
        if not isinstance(self.spectral, SpectralGrid):
            raise TypeError(
                f"'spectral' must be a SpectralGrid; got {type(self.spectral).__name__}."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nz, ny, nx)`` of the cube."""
        return (self.spectral.nz, *self.spatial.shape)

    @property
    def wave_edges(self) -> np.ndarray:
        """Wavelength bin edges (um)."""
        return self.spectral.edges

    def __eq__(self, other):
        if not isinstance(other, OutputGrid):
            return NotImplemented
        return self.spatial == other.spatial and self.spectral == other.spectral

    __hash__ = None
