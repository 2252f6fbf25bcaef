"""The documentation examples run offline and recover what they claim (simulated truth)."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number_after(text, label):
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", text)
    assert match, f"{label!r} not in the output:\n{text}"
    return float(match.group(1))


def test_yaml_pipeline_writes_a_loadable_cube(tmp_path, capsys):
    assert load("yaml_pipeline").main(["--out", str(tmp_path), "--n-exposures", "4"]) == 0
    out = capsys.readouterr().out
    expected = {"field_D3.fits", "field_D3.nc"}
    actual = {p.name for p in (tmp_path / "cubes").iterdir()}
    assert expected <= actual
    assert "'wavelength': 17" in out
    from drizzle3d.config import Drizzle3DConfig

    Drizzle3DConfig.from_yaml(tmp_path / "run.yaml")  # the written configuration is valid


def test_extract_spectrum_matches_truth_with_exact_errors(tmp_path, capsys):
    assert load("extract_spectrum").main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "errors: exact" in out
    assert number_after(out, "median |relative error|") < 0.12
    chi = number_after(out, "chi rms")
    assert 0.5 < chi < 2.0
    # exact aperture errors exceed the naive sum of voxel variances (correlated voxels)
    assert number_after(out, "exact / naive error (median)") > 1.1
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_grow_incrementally_equals_one_run(tmp_path, capsys):
    assert load("grow_incrementally").main(["--out", str(tmp_path), "--n-exposures", "6"]) == 0
    out = capsys.readouterr().out
    assert number_after(out, "max |difference|") == 0.0
    assert "same empty voxels: True" in out
    assert (tmp_path / "cube_state.npz").exists()


def test_dask_cluster_equals_serial(tmp_path, capsys):
    args = ["--workers", "2", "--chunks", "3", "--n-exposures", "6"]
    assert load("dask_cluster").main(args) == 0
    out = capsys.readouterr().out
    assert "6 image(s) used" in out
    assert number_after(out, "max |difference|") < 1e-8


@pytest.mark.parametrize(
    "name", ["yaml_pipeline", "extract_spectrum", "grow_incrementally", "dask_cluster"]
)
def test_example_documents_itself(name):
    module = load(name)
    assert module.__doc__
    assert "Run: ``python examples/" in module.__doc__
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0


def test_notebook_runs_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.loads((EXAMPLES / "notebook.ipynb").read_text())
    namespace = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    assert namespace["USE_IRSA"] is False
    expected = 6
    actual = namespace["cube"].n_images
    assert actual == expected
    assert np.isfinite(namespace["spaxel"].values).sum() > 5
    import matplotlib.pyplot as plt

    plt.close("all")
