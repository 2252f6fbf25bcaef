"""Every example runs in its offline mode, so none can rot."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_and_recovers_the_star(tmp_path, capsys):
    quickstart = load("quickstart")
    assert quickstart.main(["--out", str(tmp_path), "--n-exposures", "6"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "quickstart_cube.nc").exists()
    line = next(s for s in out.splitlines() if s.startswith("median |relative error|"))
    assert float(line.split()[3]) < 0.15


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_has_an_offline_main(path):
    text = path.read_text()
    assert "def main(" in text, f"{path.name} must define main(argv=None) for the example tests"
