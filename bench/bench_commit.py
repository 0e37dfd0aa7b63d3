#!/usr/bin/env python
"""What a commit costs, and what the stale sensor reads per tile-year, before and after
versioned storage.

"Before" is ``agrifm_pipeline/storage.py`` as of ``--before`` (default 5f90579: copy
in place, renames locally), loaded from git beside today's module; "after" is the
working tree (immutable versions, a manifest, one pointer write). Both write the
same partitions: the demo grid's shape (1024 x 28 x 28 float32) and a tile-year's
frame stack (8 x 10 x 224 x 224 uint16, one chip's worth, to keep S3 runs short).

Stores: a local directory, and S3 through s3fs against a moto server that the
bench starts on 127.0.0.1. Store requests are counted as they leave the process:
on S3 every HTTP request botocore sends; locally every file operation Python
reports through its audit hooks (open, rename/replace, remove, mkdir, listdir,
scandir, rmtree; ``stat`` is not reported, so local counts are a lower bound).

The stale sensor's reads: per tile-year it needs the current lineage of three
stages. Before: for each stage ``exists`` then ``lineage`` (what ``audit.py``
did on object stores). After: the pointer, and the manifest once per version
(cached afterwards, as in a long-lived code server).

    python bench/bench_commit.py [--repeats 5] [--json bench/results/bench_commit.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import xarray as xr  # noqa: E402

TILE = "32631_8960m_E0064_N0627"
LOCAL_EVENTS = {
    "open", "os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.listdir",
    "os.scandir", "shutil.rmtree", "os.rmdir",
}  # fmt: skip


class Counter:
    """Store requests by kind while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        if self.active:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    @contextlib.contextmanager
    def on(self) -> Iterator[dict[str, int]]:
        self.counts = {}
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


COUNTER = Counter()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in LOCAL_EVENTS:
        COUNTER.add(event)


def _load_before(rev: str) -> types.ModuleType:
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:agrifm_pipeline/storage.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("storage_before", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["storage_before"] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:storage.py", "exec"), mod.__dict__)
    return mod


def _datasets() -> dict[str, xr.Dataset]:
    rng = np.random.default_rng(0)
    grid = xr.DataArray(
        rng.normal(size=(1024, 28, 28)).astype("float32"), dims=("band", "y", "x"),
        name="embedding",
    ).to_dataset()  # fmt: skip
    frames = xr.DataArray(
        rng.integers(0, 10000, size=(8, 10, 224, 224), dtype="uint16"),
        dims=("time", "band", "y", "x"), name="frames",
    ).to_dataset()  # fmt: skip
    return {"grid": grid, "frames": frames}


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(300):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def _count_s3(fs: Any) -> None:
    import fsspec.asyn

    fsspec.asyn.sync(fs.loop, fs.set_session)
    if not getattr(fs, "_bench_counted", False):
        fs._s3.meta.events.register(
            "before-send.s3", lambda request, **kw: COUNTER.add(f"{request.method}")
        )
        fs._bench_counted = True


def _median(fn: Callable[[], Any], repeats: int) -> tuple[float, dict[str, int]]:
    times, counts = [], {}
    for _ in range(repeats):
        with COUNTER.on() as c:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        counts = dict(c)
    return float(np.median(times)) * 1000, counts


def run(repeats: int, before_rev: str) -> dict[str, Any]:
    import fsspec

    from agrifm_pipeline import storage as after

    before = _load_before(before_rev)
    sys.addaudithook(_audit)
    data = _datasets()
    proc, endpoint = _moto()
    rows: list[dict[str, Any]] = []
    try:
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
        # The old module opens roots without storage options: give s3fs the endpoint globally.
        fsspec.config.conf["s3"] = options
        import s3fs

        s3fs.S3FileSystem(**options).mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            for store_name, root in (("local", tmp), ("s3 (moto)", "s3://bench")):
                for impl_name, mod in (("before", before), ("after", after)):
                    prefix = f"{root}/{impl_name}"
                    for asset, ds in data.items():
                        lineage = {
                            "year": 2019, "tile": TILE,
                            "fingerprints": {"acquisition": {"fingerprint": "x"}},
                        }  # fmt: skip
                        store = mod.ZarrStore(prefix, asset)
                        if not store.local:
                            _count_s3(store.fs)
                        store.write(2019, TILE, ds, lineage)  # first version, not timed
                        ms, counts = _median(
                            lambda s=store, d=ds, lin=lineage: s.write(2019, TILE, d, lin), repeats
                        )
                        rows.append({
                            "what": "commit", "store": store_name, "code": impl_name,
                            "asset": asset, "ms": round(ms, 1),
                            "requests": sum(counts.values()), "by_kind": counts,
                        })  # fmt: skip
                    # The stale sensor's reads for one tile-year (three stages' lineage).
                    stores = [mod.ZarrStore(prefix, a) for a in ("frames", "grid", "grid")]

                    def judge(stores: list[Any] = stores, mod: Any = mod) -> None:
                        for s in stores:
                            if mod is before:
                                if s.exists(2019, TILE):
                                    s.lineage(2019, TILE)
                            else:
                                v = s.current(2019, TILE)
                                s.lineage(2019, TILE, v.id)

                    judge()  # warm: the manifest cache of the long-lived process
                    ms, counts = _median(judge, repeats)
                    rows.append({
                        "what": "stale-sensor reads per tile-year", "store": store_name,
                        "code": impl_name, "asset": "3 stages", "ms": round(ms, 1),
                        "requests": sum(counts.values()), "by_kind": counts,
                    })  # fmt: skip
    finally:
        proc.kill()
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "before": before_rev,
        "repeats": repeats,
        "rows": rows,
    }


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default="5f90579", help="git revision of the old storage.py")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    out = run(args.repeats, args.before)
    print(f"{'what':34} {'store':10} {'code':7} {'asset':9} {'ms':>8} {'requests':>9}")
    for r in out["rows"]:
        print(
            f"{r['what']:34} {r['store']:10} {r['code']:7} {r['asset']:9} {r['ms']:8.1f} "
            f"{r['requests']:9d}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
