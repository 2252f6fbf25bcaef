"""Simulated full-frame SPHEREx exposures for the benchmarks, written once to a cache."""

from __future__ import annotations

from pathlib import Path

CENTER = (150.0, 2.0)


def full_frame_field(cache: Path, n: int, seed: int) -> list[str]:
    """Paths of ``n`` full-frame (2040 x 2040) D3 exposures, simulated into ``cache`` once."""
    paths = sorted(str(p) for p in cache.glob("level2_*.fits"))
    if len(paths) >= n:
        return paths[:n]
    from drizzle3d.simulate import simulate_field

    print(f"simulating {n} full-frame D3 exposures into {cache} (once) ...", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    f = simulate_field(cache, n_exposures=n, shape=(2040, 2040), center=CENTER, seed=seed)
    return [str(p) for p in f.paths]
