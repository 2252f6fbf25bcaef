"""Scale-out (issue 7): parallel back-ends, incremental cubes, kill-and-resume, tiled mosaics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

from drizzle3d.io import load_state, save_state
from drizzle3d.pipeline import drizzle_files, drizzle_tiled

VARS = ("out_sci", "out_var", "out_wht", "out_count", "out_mask", "out_or_mask", "out_ctx")


def assert_same_cube(actual, expected, rtol=1e-12):
    """Equal to ``rtol`` relative to each array's largest value (sci crosses zero)."""
    for name in VARS:
        a = np.asarray(getattr(actual, name).values, dtype=float)
        e = np.asarray(getattr(expected, name).values, dtype=float)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(e), err_msg=name)
        scale = np.nanmax(np.abs(e)) if np.isfinite(e).any() else 1.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.fixture(scope="module")
def serial(small_field, small_grid):
    return drizzle_files(small_field.paths, small_grid)


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


# ---------------------------------------------------------------- Must-show 1
def test_serial_threads_processes_and_local_cluster_agree(
    small_field, small_grid, serial, cluster_client
):
    expected = serial
    runs = {
        "threads": drizzle_files(small_field.paths, small_grid, n_workers=2),
        "threads x3": drizzle_files(small_field.paths, small_grid, n_workers=3),
        "processes": drizzle_files(
            small_field.paths, small_grid, n_workers=2, executor="processes"
        ),
        "processes x3": drizzle_files(
            small_field.paths, small_grid, n_workers=3, executor="processes"
        ),
        "LocalCluster": drizzle_files(small_field.paths, small_grid, client=cluster_client),
    }
    for name, actual in runs.items():
        assert actual.run_summary.to_dict() == expected.run_summary.to_dict(), name
        assert actual.n_images == expected.n_images == len(small_field.paths)
        assert_same_cube(actual, expected)


def _shared_files():
    from drizzle3d.pipeline import _shared_dir

    return {f for f in os.listdir(_shared_dir()) if f.startswith(f"drizzle3d-{os.getpid()}-")}


def test_process_pool_is_kept_and_survives_dead_workers(small_field, small_grid, serial):
    from drizzle3d import pipeline

    def run(**kw):
        return drizzle_files(small_field.paths, small_grid, n_workers=2, executor="processes", **kw)

    assert_same_cube(run(), serial)
    pool = pipeline._POOL["pool"][1]
    assert_same_cube(run(), serial)
    assert pipeline._POOL["pool"][1] is pool  # started once, reused
    # workers killed between runs: the next run starts a new pool and loses nothing
    for proc in list(pool._processes.values()):
        proc.kill()
        proc.join()
    actual = run()
    assert pipeline._POOL["pool"][1] is not pool
    assert_same_cube(actual, serial)
    assert actual.run_summary.to_dict() == serial.run_summary.to_dict()

    # a worker killed while the run is under way: its inputs are retried, none is lost
    killed = []

    def progress(iterable, **_kw):
        if not killed:  # once: the retry rounds run undisturbed
            procs = list(pipeline._POOL["pool"][1]._processes.values())
            os.kill(procs[0].pid, signal.SIGKILL)
            killed.append(procs[0].pid)
        yield from iterable

    actual = run(progress=progress)
    assert_same_cube(actual, serial)
    assert actual.run_summary.to_dict() == serial.run_summary.to_dict()

    # in shared memory: only the workers' accumulator files, kept for the next run (the
    # pool's one, and those of a LocalCluster used earlier in this session)
    def acc_files(key):
        return {os.path.basename(path) for path, _ in pipeline._ACC_FILES[key][1]}

    pool_files = acc_files("pool")
    assert len(pool_files) == 1
    assert _shared_files() == set().union(*(acc_files(k) for k in pipeline._ACC_FILES))
    pipeline._shutdown_pool()  # ... and the pool's are removed with the pool
    assert not _shared_files() & pool_files


def test_accumulator_files_fall_back_are_released_and_stale_ones_removed(
    small_field, small_grid, serial, monkeypatch
):
    from drizzle3d import pipeline

    def run():
        return drizzle_files(small_field.paths, small_grid, n_workers=2, executor="processes")

    pipeline._shutdown_pool()
    # a dead session's files (its pid no longer runs) are removed when new files are made
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dirs = {pipeline._shared_dir(), tempfile.gettempdir()}
    tag = pipeline._host_tag()
    stale = [os.path.join(d, f"drizzle3d-{dead.pid}-{tag}0123456789ab-acc0") for d in dirs]
    # ... but not those of another machine sharing the directory (a container's pids)
    other = os.path.join(pipeline._shared_dir(), f"drizzle3d-{dead.pid}-zzzzzz0123456789ab")
    for path in [*stale, other]:
        open(path, "wb").close()
    # /dev/shm without room for the files (as in a container): a temporary directory serves
    monkeypatch.setattr(pipeline, "_SHM_MARGIN", 2**62)
    actual = run()
    assert_same_cube(actual, serial)
    assert not any(os.path.exists(p) for p in stale)
    assert os.path.exists(other)
    os.unlink(other)
    kept = [path for path, _ in pipeline._ACC_FILES["pool"][1]]
    assert kept
    assert all(not path.startswith("/dev/shm") for path in kept)
    monkeypatch.undo()
    # files larger than _KEEP_ACC_BYTES are not kept between runs
    pipeline._shutdown_pool()
    monkeypatch.setattr(pipeline, "_KEEP_ACC_BYTES", 0)
    assert_same_cube(run(), serial)
    assert "pool" not in pipeline._ACC_FILES
    assert not any(os.path.exists(p) for p in kept)


def _worker_env():
    names = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS")
    return {k: os.environ.get(k) for k in names}


def test_local_cluster_workers_keep_freed_memory(small_field, small_grid, serial):
    # drizzle3d's LocalCluster: dask's worker settings, but freed memory is kept for reuse
    # (dask's MALLOC_TRIM_THRESHOLD_=65536 makes every large temporary a fresh, page-faulted
    # allocation), also after a default cluster left that variable in this process; results
    # unchanged
    distributed = pytest.importorskip("distributed")
    from drizzle3d.pipeline import local_cluster

    with local_cluster(2) as cluster, distributed.Client(cluster) as client:
        envs = client.run(_worker_env)
        actual = drizzle_files(small_field.paths, small_grid, client=client)
    assert len(envs) == 2
    for env in envs.values():
        assert env == {
            "MALLOC_TRIM_THRESHOLD_": str(2**27),
            "MALLOC_MMAP_THRESHOLD_": str(2**25),
            "OMP_NUM_THREADS": "1",
        }
    assert_same_cube(actual, serial)
    assert actual.run_summary.to_dict() == serial.run_summary.to_dict()


def test_interrupted_process_run_stops_at_once_and_spoils_nothing(
    small_field, small_grid, serial, monkeypatch
):
    # an exception out of a run (Ctrl-C in the progress bar) stops every worker at its next
    # image; the workers' files are replaced, so a task still finishing its image cannot add
    # to the next run's sums
    from drizzle3d import pipeline

    def run(**kw):
        return drizzle_files(small_field.paths, small_grid, n_workers=2, executor="processes", **kw)

    run()
    before = [path for path, _ in pipeline._ACC_FILES["pool"][1]]
    after_interrupt = []
    interrupted = []
    claimed = pipeline._claimed

    def counting(items, claim_dir, taken):  # this process's own share
        for item in claimed(items, claim_dir, taken):
            if interrupted:
                after_interrupt.append(item)
            yield item

    def progress(iterable, **_kw):
        for n, item in enumerate(iterable):
            if n == 1:
                interrupted.append(True)
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(pipeline, "_claimed", counting)
    with pytest.raises(KeyboardInterrupt):
        run(progress=progress)
    assert interrupted
    # (one claim may slip in between the interrupt and the closing of the claims)
    assert len(after_interrupt) <= 1
    assert "pool" not in pipeline._ACC_FILES
    assert not any(os.path.exists(p) for p in before)
    monkeypatch.undo()
    actual = run()
    assert_same_cube(actual, serial)
    assert actual.run_summary.to_dict() == serial.run_summary.to_dict()


def test_dask_tasks_spread_over_workers_then_threads():
    from drizzle3d.pipeline import _task_slots

    nthreads = {"tcp://b": 2, "tcp://a": 2, "tcp://c": 1}
    assert _task_slots(nthreads, None, 100) == [
        "tcp://a",
        "tcp://b",
        "tcp://c",
        "tcp://a",
        "tcp://b",
    ]
    assert _task_slots(nthreads, 2, 100) == ["tcp://a", "tcp://b"]  # n_workers: tasks
    assert _task_slots(nthreads, None, 1) == ["tcp://a"]  # no more tasks than inputs


def test_worker_mappings_are_safe_across_threads(tmp_path):
    # the tasks of a multi-threaded dask worker share its mappings: letting go of removed
    # files while another task maps its own must not fail
    from concurrent.futures import ThreadPoolExecutor

    from drizzle3d import pipeline

    shape = (4, 4, 2, 7)
    paths = [str(tmp_path / f"acc{k}") for k in range(40)]
    for path in paths:
        pipeline._shared_array(path, shape, create=True)

    def use(k):
        acc = pipeline._worker_acc(paths[k], shape)
        os.unlink(paths[k])  # removed by the caller: the next call lets go of it
        return acc.shape

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(use, range(len(paths)))) == [shape] * len(paths)
    assert len(pipeline._WORKER_ACC) <= 4
    pipeline._WORKER_ACC.clear()


def test_claims_hand_each_input_to_exactly_one_worker(tmp_path):
    # workers on one machine take inputs first come, first served: each exactly once
    from drizzle3d.pipeline import _claimed

    items = [f"item{i}" for i in range(11)]
    claim_dir = tmp_path / "claims"
    claim_dir.mkdir()
    taken = ([], [])
    gens = [_claimed(items, str(claim_dir), t) for t in taken]
    got, live = ([], []), [0, 1]
    while live:
        for w in list(live):
            try:
                got[w].append(next(gens[w]))
            except StopIteration:
                live.remove(w)
    assert sorted(taken[0] + taken[1]) == list(range(len(items)))
    assert taken[0]
    assert taken[1]
    assert [items[i] for i in taken[0]] == got[0]
    # a task that starts after its run is over (claim directory gone) takes nothing
    import shutil

    shutil.rmtree(claim_dir)
    late: list[int] = []
    assert list(_claimed(items, str(claim_dir), late)) == []
    assert late == []


def test_input_order_does_not_matter(small_field, small_grid, serial):
    # reversed list, with each image keeping its context id: equal to the serial run
    paths = list(small_field.paths)
    actual = drizzle_files(paths[::-1], small_grid, n_workers=2)
    for name in ("out_sci", "out_var", "out_wht", "out_count"):
        e = getattr(serial, name).values
        np.testing.assert_allclose(
            getattr(actual, name).values, e, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(e))
        )


@pytest.mark.parametrize("backend", ["threads", "processes", "LocalCluster"])
def test_progress_ticks_once_per_image(small_field, small_grid, backend, request):
    # every back-end advances the caller's progress bar once per image, as workers finish
    ticks = []

    def progress(iterable, **_kw):
        for item in iterable:
            ticks.append(1)
            yield item

    kw = {"n_workers": 2}
    if backend == "processes":
        kw["executor"] = "processes"
    elif backend == "LocalCluster":
        kw = {"client": request.getfixturevalue("cluster_client")}
    drizzle_files(small_field.paths, small_grid, progress=progress, **kw)
    assert len(ticks) == len(small_field.paths)


# ---------------------------------------------------------------- Must-show 2
def test_incremental_update_equals_one_run_and_refuses_readding(
    small_field, small_grid, serial, tmp_path
):
    paths = [str(p) for p in small_field.paths]
    first = drizzle_files(paths[:4], small_grid, n_workers=2)
    store = save_state(first, tmp_path / "cube.state.zarr", meta={"used": first.run_summary.used,
                       "run_settings": first.run_settings})  # fmt: skip
    actual = drizzle_files(paths[4:], small_grid, resume=store, n_workers=2)
    assert_same_cube(actual, serial)
    assert [u["path"] for u in actual.run_summary.used] == paths
    # re-adding an included image is refused before any work ...
    with pytest.raises(ValueError, match="already included"):
        drizzle_files([paths[1]], small_grid, resume=actual)
    # ... also after the file was copied elsewhere (same content hash)
    copy = tmp_path / "copy.fits"
    with open(paths[5], "rb") as fh:
        copy.write_bytes(fh.read())
    with pytest.raises(ValueError, match="already included"):
        drizzle_files([str(copy)], small_grid, resume=actual)
    # duplicates="skip" leaves them out and says so; the cube is unchanged
    again = drizzle_files(paths, small_grid, resume=actual, duplicates="skip")
    assert again.run_summary.already_included == paths
    assert_same_cube(again, serial)
    # settings must match the saved cube
    with pytest.raises(ValueError, match="'zodi' must match"):
        drizzle_files(paths[4:], small_grid, resume=store, zodi="static")


def test_state_store_round_trip_is_exact(serial, tmp_path):
    path = save_state(serial, tmp_path / "s.state.zarr", meta={"note": [1, 2]})
    actual, meta = load_state(path)
    assert meta == {"note": [1, 2]}
    for key, value in serial.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(actual.state[key], value, err_msg=key)
        else:
            assert actual.state[key] == value


# ---------------------------------------------------------------- Must-show 3
_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from drizzle3d.grid import OutputGrid
    from drizzle3d.pipeline import drizzle_files

    grid = OutputGrid.from_yaml(open(sys.argv[1]).read())
    paths = sys.argv[3:]

    def slow(iterable, **kwargs):  # one image every 0.4 s, so the test can kill mid-run
        for item in iterable:
            time.sleep(0.4)
            yield item

    drizzle_files(paths, grid, checkpoint=sys.argv[2], checkpoint_every=2, progress=slow)
    """
)


def test_killed_run_resumes_from_checkpoint(small_field, small_grid, serial, tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(small_grid.to_yaml())
    store = tmp_path / "run.state.zarr"
    paths = [str(p) for p in small_field.paths]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(grid_file), str(store), *paths],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + 60
        n_saved = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists():
                try:
                    _, meta = load_state(store)
                    n_saved = len(meta["used"])
                except (ValueError, KeyError, OSError):
                    n_saved = 0
                if n_saved >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, meta = load_state(store)
    assert not meta["complete"]
    done = len(meta["used"])
    assert 2 <= done < len(paths)
    actual = drizzle_files(paths, small_grid, resume=store, duplicates="skip",
                           checkpoint=store, checkpoint_every=2)  # fmt: skip
    assert len(actual.run_summary.already_included) == done
    assert [u["path"] for u in actual.run_summary.used] == paths
    assert actual.n_images == len(paths)
    assert_same_cube(actual, serial)
    _, meta = load_state(store)
    assert meta["complete"]


# ---------------------------------------------------------------- Must-show 4
def test_tiled_run_equals_untiled(small_field, small_grid, tmp_path):
    expected = drizzle_files(small_field.paths, small_grid, fast_pixmap=False).to_dataset()
    store = drizzle_tiled(small_field.paths, small_grid, tmp_path / "t.zarr",
                          tile_shape=(20, 25), fast_pixmap=False, n_workers=2)  # fmt: skip
    actual = xr.open_zarr(store, consolidated=False)
    assert actual["sci"].chunks[1][0] == 20
    assert actual["sci"].chunks[2][0] == 25
    assert actual.attrs["n_images"] == len(small_field.paths)
    assert json.loads(actual.attrs["run_summary"])["counts"]["used"] == len(small_field.paths)
    # Measured: weights agree to ~1e-10 of the largest weight, values to ~1e-9; which
    # input pixels reach which voxels is identical (overlaps below 1e-9 of a drop's area are
    # not contributions, so round-off in tile-shifted coordinates cannot flip them)
    for name in ("count", "and_mask", "or_mask"):
        np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)
    wht_e = expected["wht"].values
    np.testing.assert_array_equal(actual["wht"].values == 0, wht_e == 0)
    np.testing.assert_allclose(actual["wht"].values, wht_e, rtol=0, atol=1e-9 * wht_e.max())
    solid = wht_e > 1e-9 * wht_e.max()
    for name in ("sci", "var", "wave"):
        e = expected[name].values
        a = actual[name].values
        np.testing.assert_allclose(
            a[solid], e[solid], rtol=1e-8, atol=1e-10 * np.nanmax(np.abs(e)), err_msg=name
        )
    np.testing.assert_array_equal(actual["ctx"].values, expected["ctx"].values)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from drizzle3d.grid import OutputGrid, SpatialGrid, SpectralGrid
    from drizzle3d.pipeline import drizzle_tiled

    tile, store = int(sys.argv[1]), sys.argv[2]
    paths = sys.argv[3:]
    grid = OutputGrid(SpatialGrid.from_center(150.0, 2.0, 50.0, 50.0, pixscale=3.0),
                      SpectralGrid.oversampled(3, 4))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    drizzle_tiled(paths, grid, store, tile_shape=tile, n_workers=1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nz, ny, nx = grid.shape
    print(json.dumps({"before_kb": before, "after_kb": after, "shape": [nz, ny, nx]}))
    """
)


def test_tiled_peak_memory_is_bounded_by_the_tile(small_field, tmp_path):
    # a 66 x 1000 x 1000 mosaic: 66 M voxels, 4.2 GB of float64 state if built at once
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, "125", str(tmp_path / "big.zarr"),
         *[str(p) for p in small_field.paths[:2]]],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    nz, ny, nx = res["shape"]
    full_state_mb = nz * ny * nx * 64 / 1e6
    tile_state_mb = 125 * 125 * nz * 64 / 1e6
    growth_mb = (res["after_kb"] - res["before_kb"]) / 1e3
    peak_mb = res["after_kb"] / 1e3
    print(f"state {full_state_mb:.0f} MB untiled; tile {tile_state_mb:.0f} MB; "
          f"peak RSS {peak_mb:.0f} MB (+{growth_mb:.0f} MB during the run)")  # fmt: skip
    assert full_state_mb > 4_000
    # bound: a tile's state plus its output copies (~3x) plus a generous allowance
    assert growth_mb < 4 * tile_state_mb + 300
    ds = xr.open_zarr(tmp_path / "big.zarr", consolidated=False)
    assert ds["sci"].shape == (nz, ny, nx)
    assert ds["sci"].chunks[1][0] == 125


@pytest.mark.parametrize("scheduler", [None, "processes", "local"])
def test_config_update_adds_only_new_images(small_field, small_grid, serial, tmp_path, scheduler):
    # through a YAML-style configuration, on each local back-end (threads, the process
    # pool, drizzle3d's LocalCluster)
    from drizzle3d import pipeline
    from drizzle3d.config import Drizzle3DConfig
    from drizzle3d.io import load_cube
    from drizzle3d.pipeline import drizzle

    paths = [str(p) for p in small_field.paths]

    def config(files):
        return Drizzle3DConfig.from_dict({
            "region": {"ra": 150.0, "dec": 2.0, "width": 6.0},
            "inputs": {"files": files},
            "output": {"directory": str(tmp_path), "formats": ["netcdf"], "update": True},
            "workers": 2,
            "scheduler": scheduler,
        })  # fmt: skip

    drizzle(config(paths[:4]))
    written = drizzle(config(paths))  # all eight listed: only the last four are added
    actual = load_cube(written["D3.nc"])
    expected = serial.to_dataset()
    for name in ("sci", "var", "wht", "count"):
        e = expected[name].values
        np.testing.assert_allclose(
            actual[name].values, e, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(e)), err_msg=name
        )
    summary = json.loads(actual.attrs["run_summary"])
    assert summary["counts"]["already_included"] == 4
    assert actual.attrs["n_images"] == 8
    if scheduler == "local":  # the cluster it started is gone, and its files with it
        assert not [k for k in pipeline._ACC_FILES if k[0] == "dask"]
