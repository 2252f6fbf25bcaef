"""The benchmark scripts still run (tiny sizes; the figures themselves are not checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("drizzle")


def test_bench_core_runs_and_prints_every_ratio():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_core.py"), "--n-in", "48", "--n-out", "52",
         "--repeat", "3"],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    for label in (
        "speed ratio drizzle3d(1 bin) / drizzle",
        "the same without wavelength tracking",
        "cost ratio 34 bins / 1 bin",
        "2-thread speed-up over 1 thread",
    ):
        line = next((ln for ln in out.splitlines() if label in ln), None)
        assert line is not None, f"{label!r} missing from:\n{out}"
        assert re.search(r"\d+\.\d\dx", line), line
    # per-round ratios: median [min-max] over the 3 interleaved rounds
    rounds = re.findall(r"per round (\d+\.\d\d)x \[(\d+\.\d\d)-(\d+\.\d\d)\]", out)
    assert len(rounds) == 3
    for median, low, high in rounds:
        assert float(low) <= float(median) <= float(high)
