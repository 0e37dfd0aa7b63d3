"""The deployment-wide request limit: several processes against one stand-in.

Each process runs the real client with more threads than the shared limit
allows; the stand-in counts how many requests it serves at once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.providers.ee_slots import SlotDirectory

from .ee_standin import ee_standin

N_PROCESSES = 3
THREADS = 6
SLOTS = 4


def _acquire(url: str, project: str, slots_dir: str, queue: multiprocessing.Queue, barrier) -> None:
    """One worker process: a tile-year over the sample, in many small pixel requests."""
    import google.oauth2.credentials
    from odc.geo.geobox import GeoBox

    from agrifm_pipeline.frames import frame_windows
    from agrifm_pipeline.providers.base import CloudMask
    from agrifm_pipeline.providers.gee import EarthEngineProvider
    from agrifm_pipeline.specs import SensorSpec

    area = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)
    provider = EarthEngineProvider(
        project=project,
        credentials=google.oauth2.credentials.Credentials(token="t"),
        endpoint=url,
        max_concurrent=THREADS,
        deployment_slots=SLOTS,
        slots_dir=slots_dir,
        max_request_bytes=40_000,  # about 18 pixel requests per tile-year
    )
    provider.initialise()
    barrier.wait(timeout=120)  # every process starts its tile-year together
    start = time.time()
    stack = provider.fetch(area, frame_windows(2019, 8), SensorSpec(), CloudMask())
    queue.put((stack.extra["requests"], start, time.time()))


def _run_processes(tmp_path: Path, shared: bool) -> tuple[int, list[tuple[int, float, float]]]:
    ctx = multiprocessing.get_context("spawn")
    with ee_standin() as s:
        s.delay_s = 0.05
        s.max_bytes = 40_000
        queue, barrier = ctx.Queue(), ctx.Barrier(N_PROCESSES)
        procs = [
            ctx.Process(
                target=_acquire,
                args=(
                    s.url,
                    s.project,
                    str(tmp_path / ("slots" if shared else f"own{i}")),
                    queue,
                    barrier,
                ),
            )
            for i in range(N_PROCESSES)
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return s.in_flight_max, results


def test_the_limit_holds_across_processes(tmp_path: Path) -> None:
    in_flight_max, results = _run_processes(tmp_path, shared=True)
    assert all(requests > SLOTS for requests, _, _ in results)  # each could send more at once
    assert max(start for _, start, _ in results) < min(end for _, _, end in results)  # overlapped
    assert 1 < in_flight_max <= SLOTS


def test_without_a_shared_directory_the_processes_exceed_it(tmp_path: Path) -> None:
    """The counterfactual: the same processes, each with its own slot directory."""
    in_flight_max, _ = _run_processes(tmp_path, shared=False)
    assert in_flight_max > SLOTS


def test_slot_directory_threads_and_validation(tmp_path: Path) -> None:
    slots = SlotDirectory(tmp_path / "s", 2)
    active, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with slots.slot():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and slots.held_max == 2
    with pytest.raises(SettingsError, match="slots=0"):
        SlotDirectory(tmp_path / "t", 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingsError, match="RS_EMBED_AGRIFM_GEE_SLOTS_DIR"):
        SlotDirectory(tmp_path / "file" / "sub", 2)
