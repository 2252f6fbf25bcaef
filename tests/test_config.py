"""Config: exact YAML round trip of every field; invalid configs rejected with clear messages."""

from __future__ import annotations

import math

import pytest

from drizzle3d.config import EXAMPLE_YAML, Drizzle3DConfig


def _full_config():
    return Drizzle3DConfig.from_dict(
        {
            "region": {"ra": 210.8, "dec": 54.35, "width": 12.5, "height": 7.25, "rotation": 33.3},
            "detectors": [1, 4, 6],
            "pixel_scale": 3.075,
            "spectral": {
                "mode": "edges",
                "factor": 3.0,
                "resolving_power": 130.0,
                "lam_min": 0.75,
                "lam_max": 5.0,
                "edges": [1.7, 1.8000000000000003, 0.1 + 2.2, 2.41],
            },
            "drizzle": {
                "kernel": "turbo",
                "pixfrac": 0.7,
                "wave_pixfrac": 0.9,
                "weighting": "ivm",
                "ivar_max": 1e6,
                "min_overlap": 0.01,
                "exclude_flags": ["HOT", "cold", "TRANSIENT"],
                "zodi": "static",
            },
            "outliers": {"enabled": True, "snr": [4.5, 3.5], "scale": [1.5, 0.5], "grow": 2},
            "inputs": {
                "query": {"mjd_range": [61000.5, None], "max_images": 40, "releases": "qr2"},
                "mirror": "/data/irsa",
            },
            "download": {"dest": "dl", "mode": "full", "workers": 8, "overwrite": True},
            "output": {
                "directory": "out",
                "prefix": "m31",
                "formats": ["fits", "netcdf", "zarr"],
                "overwrite": True,
                "update": True,
                "checkpoint_every": 50,
                "tile_size": 512,
            },
            "workers": 2,
            "scheduler": "tcp://10.0.0.1:8786",
        }
    )


def test_yaml_round_trip_every_field_exact(tmp_path):
    expected = _full_config()
    actual = Drizzle3DConfig.from_yaml(expected.to_yaml())
    assert actual == expected
    assert actual.spectral.edges == (1.7, 1.8000000000000003, 2.3000000000000003, 2.41)
    path = tmp_path / "run.yaml"
    expected.to_yaml(path)
    assert Drizzle3DConfig.from_yaml(path) == expected
    # every field differs from its default, so the round trip really covers every field
    default = Drizzle3DConfig().to_dict()
    full = expected.to_dict()
    for section, values in full.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if section == "inputs" and key in ("files", "glob"):
                    continue  # exclusive with query
                assert value != default[section][key], (section, key)


def test_defaults_and_example():
    c = Drizzle3DConfig.from_yaml(EXAMPLE_YAML)
    assert c == Drizzle3DConfig()
    assert c.drizzle.weighting == "background"
    assert "SOURCE" not in c.drizzle.exclude_flags
    assert "HOT" in c.drizzle.exclude_flags
    assert math.isinf(c.drizzle.ivar_max)
    assert c.grid(3).shape == (17, 293, 293)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"regoin": {}}, ValueError, r"'regoin' is not a known key; allowed keys are \['region'"),
        ({"drizzle": {"kernal": "square"}}, ValueError, r"'drizzle.kernal' is not a known key"),
        ({"drizzle": {"kernel": "cubic"}}, ValueError, r"'drizzle.kernel' must be one of \["),
        ({"drizzle": {"pixfrac": 1.5}}, ValueError, r"'drizzle.pixfrac' must be <= 1"),
        ({"drizzle": {"weighting": "optimal"}}, ValueError, r"'drizzle.weighting' must be one of"),
        ({"drizzle": {"exclude_flags": ["HOTT"]}}, ValueError, r"must hold flag names from"),
        ({"detectors": [0, 3]}, ValueError, r"'detectors' must be a list of 1..6 or 'all'"),
        ({"region": {"dec": 95.0}}, ValueError, r"'region.dec' must be <= 90"),
        ({"region": {"width": -1.0}}, ValueError, r"'region.width' must be > 0"),
        ({"spectral": {"mode": "edges"}}, ValueError, r"'spectral.edges' must be given"),
        ({"spectral": {"edges": [2.0, 1.0]}}, ValueError, r"must be strictly increasing"),
        ({"output": {"formats": ["hdf5"]}}, ValueError, r"'output.formats' must be one of"),
        ({"outliers": {"enabled": "yes"}}, TypeError, r"'outliers.enabled' must be true or false"),
        ({"workers": -1}, ValueError, r"'workers' must be >= 0"),
        ({"scheduler": "mpi"}, ValueError, r"'scheduler' must be null, 'threads'"),
        ({"output": {"checkpoint_every": -2}}, ValueError, r"'output.checkpoint_every' must be"),
        ({"outliers": {"snr": [5.0]}}, ValueError, r"'outliers.snr' must be \[first, second\]"),
        ({"inputs": {"files": ["a.fits"], "glob": "*.fits"}}, ValueError, r"one of files, glob"),
        ({"pixel_scale": "6"}, TypeError, r"'pixel_scale' must be a number; got '6'"),
    ],
)
def test_invalid_configs_are_rejected_with_the_key(data, error, match):
    with pytest.raises(error, match=match):
        Drizzle3DConfig.from_dict(data)


def test_bad_yaml_text():
    with pytest.raises(ValueError, match="'source' must be valid YAML"):
        Drizzle3DConfig.from_yaml("region: [unclosed\n")
