"""Shared session fixtures: small simulated SPHEREx fields written once per session."""

from __future__ import annotations

import pytest

from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
from drizzle3d.simulate import simulate_field

CENTER = (150.0, 2.0)


@pytest.fixture(scope="session")
def small_field(tmp_path_factory):
    """Sky.default seen by 8 D3 exposures of 96 x 96 pixels (noise, zodi, flagged pixels)."""
    return simulate_field(
        tmp_path_factory.mktemp("small_field"),
        n_exposures=8,
        shape=(96, 96),
        center=CENTER,
        seed=7,
    )


@pytest.fixture(scope="session")
def small_grid():
    """A 6 x 6 arcmin native-D3 grid on the small field."""
    return OutputGrid(SpatialGrid.from_center(*CENTER, 6.0, 6.0), SpectralGrid.native(3))


@pytest.fixture(scope="session")
def small_cube(small_field, small_grid):
    """The small field drizzled with the default pipeline settings."""
    from drizzle3d.pipeline import drizzle_files

    return drizzle_files(small_field.paths, small_grid)
