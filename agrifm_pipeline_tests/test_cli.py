"""The command line: demo on the bundled sample, embed, settings, errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agrifm_pipeline.cli import DEMO_DATA, demo_stack, main


def test_demo_stack_is_real_bundled_data() -> None:
    stack, dates = demo_stack(DEMO_DATA, 8)
    assert stack.shape == (8, 10, 64, 64) and stack.dtype == np.uint16
    assert dates == sorted(dates) and len(set(dates)) == 8
    # Clear scenes over fields: plausible reflectance, not fill.
    assert 100 < float(np.median(stack[:, 2])) < 3000


def test_demo_runs_and_says_untrained(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("RS_EMBED_AGRIFM_CKPT", raising=False)
    out = tmp_path / "demo.zarr"
    assert (
        main(["roi-demo", "--device", "cpu", "--checkpoint", "untrained:0", "--out", str(out)]) == 0
    )
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err
    assert "grid [1024, 7, 7]" in captured.out
    import xarray as xr

    grid = xr.open_zarr(out)["agrifm_embedding"]
    assert grid.shape == (1024, 7, 7)
    assert json.loads(grid.attrs["meta"])["untrained"] is True


def test_embed_writes_embedding_and_meta(tmp_path: Path, fixtures_dir: Path, capsys) -> None:
    x = np.random.default_rng(0).integers(0, 5000, size=(3, 10, 20, 30)).astype(np.uint16)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "e.npz"
    rc = main(["embed", str(tmp_path / "x.npy"), "--checkpoint", str(fixtures_dir / "tiny_p444.pth"),
               "--device", "cpu", "--output", "grid", "--out", str(out)])  # fmt: skip
    assert rc == 0
    z = np.load(out)
    assert z["embedding"].shape == (128, 7, 7)
    meta = json.loads(str(z["meta"]))
    assert meta["input_original_frames"] == 3 and meta["input_frames"] == 8


def test_errors_are_reported_not_raised(tmp_path: Path, capsys) -> None:
    assert main(["embed", str(tmp_path / "missing.npy"), "--checkpoint", "untrained:0"]) == 2
    assert "missing.npy" in capsys.readouterr().err


def test_settings_command(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RS_EMBED_AGRIFM_FRAMES", "12")
    assert main(["settings"]) == 0
    assert json.loads(capsys.readouterr().out)["RS_EMBED_AGRIFM_FRAMES"] == 12


def test_code_location_loads() -> None:
    from agrifm_pipeline.definitions import defs

    assert defs is not None


# What the demo sets in its process (and <home>/demo.env records), and where the homes are.
DEMO_SETTINGS = (
    "AGRIFM_PIPELINE_CHIP_PX",
    "AGRIFM_PIPELINE_CHIPS_PER_SIDE",
    "AGRIFM_PIPELINE_REGIONS_DIR",
    "AGRIFM_PIPELINE_S2_LOCAL_ROOT",
    "RS_EMBED_AGRIFM_CKPT",
    "AGRIFM_PIPELINE_HOME",
)


def _unset(mp: pytest.MonkeyPatch, *names: str) -> None:
    """Unset ``names`` so that the undo also removes what the code under test sets later
    (a plain delenv of an unset variable records nothing to undo)."""
    for name in names:
        mp.setenv(name, "")
        mp.delenv(name)


@dataclass(frozen=True)
class DemoRun:
    dir: Path  # where it ran (its working directory)
    home: Path  # --home
    out: str  # what it printed


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """`make demo CHECKPOINT=untrained:0` once, in a directory of its own, with none of its
    settings in the environment and DAGSTER_HOME elsewhere than its home (all restored
    afterwards), for the tests that read what it made and printed."""
    from agrifm_pipeline.demo import demo_env

    tmp = tmp_path_factory.mktemp("demo")
    home = tmp / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(tmp / "dagster"))
        _unset(mp, *DEMO_SETTINGS, *demo_env())
        mp.chdir(tmp)  # the demo finds its data from anywhere
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(
                ["demo", "--checkpoint", "untrained:0", "--device", "cpu", "--home", str(home)]
            )
        assert rc == 0, buf.getvalue()
    yield DemoRun(tmp, home, buf.getvalue())


def test_main_job_demo_on_local_defaults(demo_run: DemoRun, monkeypatch, capsys) -> None:
    """`make demo`'s command: the demo region for 2019 through every asset, untrained weights."""
    import xarray as xr

    from agrifm_pipeline.demo import demo_env

    tmp_path, home, out = demo_run.dir, demo_run.home, demo_run.out
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    _unset(monkeypatch, *DEMO_SETTINGS, *demo_env())  # the audit sets them from demo.env
    assert "untrained=True" in out and " ui CHECKPOINT=untrained:0   # the Dagster UI" in out
    # The demo's grid is fitted to the sample: one 64 px chip, nearly all of it data.
    assert "coverage 32631_640m_E0898_N8784: data in 87.9%" in out and "1 of 1 chip" in out
    # Progress: plain lines (the output is not a terminal) that reach 100 %.
    assert re.search(r"step (\d+)/\1\b", out) and "chips 1/1" in out
    assert "finished" in out and "(100 %)" in out
    # The printed commands name this interpreter's paths (nothing to activate first).
    assert f"{sys.executable} -c" in out and "rio" in out
    # The printed paths are the current versions, and they open.
    (mosaic,) = [line.strip() for line in out.splitlines() if "region_mosaic.zarr/" in line][:1]
    ds = xr.open_zarr(mosaic, decode_coords="all")
    assert str(ds.rio.crs) == "EPSG:32631" and ds["embedding"].shape == (1024, 7, 7)
    # The mosaic's COG opens with any GDAL (rasterio's here), georeferenced, every band.
    import rasterio

    (cog,) = [line.strip() for line in out.splitlines() if "region_mosaic_cog/" in line]
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == 32631 and src.count == 1024 and src.shape == (7, 7)
        assert src.transform == ds.rio.transform()
    grid = next(
        line.strip() for line in out.splitlines() if "agrifm_embedding_grid.zarr/2019/" in line
    )
    assert xr.open_zarr(grid).attrs["untrained"] == 1
    assert (home / "store" / "catalog.json").is_file()
    # The runs are in the SQLite instance that `dagster dev` will read.
    assert (tmp_path / "dagster" / "dagster.yaml").is_file()
    assert any((tmp_path / "dagster").rglob("*.db"))
    # The UI reads the demo's settings from the home, the checkpoint included; the audit
    # was materialised.
    recorded = (home / "demo.env").read_text()
    assert "AGRIFM_PIPELINE_CHIP_PX=64" in recorded
    assert "RS_EMBED_AGRIFM_CKPT=untrained:0" in recorded
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("lineage_audit"))

    # The audit of that home: every row that is not current says why; the summary is whole.
    capsys.readouterr()
    assert main(["audit", "--home", str(home), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["asset"] for r in rows} >= {"s2_frame_stack", "agrifm_embedding_grid"}
    assert all(r["why"] for r in rows if r["status"] != "current"), rows
    # CSV is streamed row by row: the same rows, in the same order.
    assert main(["audit", "--home", str(home), "--format", "csv"]) == 0
    as_csv = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["asset"], r["tile"], r["year"], r["status"], r["why"]) for r in as_csv] == [
        (r["asset"], r["tile"], str(r["year"]), r["status"], r["why"]) for r in rows
    ]
    assert main(["audit", "--home", str(home)]) == 0
    summary = capsys.readouterr().err
    after = summary.split("current checkpoint ", 1)[1].split("\n")[0]
    assert after.endswith("…") or len(after) > 17, summary  # a hash, or the whole reason


def _printed(out: str, marker: str) -> str:
    """The one command the demo printed that contains ``marker``, without its comment."""
    (line,) = [ln for ln in out.splitlines() if marker in ln and "   # " in ln]
    return line.split("   # ")[0].strip()


def test_demo_follow_up_commands_work_as_printed_offline(demo_run: DemoRun, tmp_path) -> None:
    """After `make demo CHECKPOINT=untrained:0`, the commands the demo prints (`make ui`,
    the audit, and those that open the mosaic) work as printed, in a fresh shell (no checkpoint, demo setting or Dagster home
    in its environment) with no way to download or find the official checkpoint: `make
    ui` names the checkpoint and its code location resolves the one the demo used (the
    stand-in for `dagster` reports what `dagster dev` would load, with PORT passed as
    -p), and the audit judges every partition, none "unknown" for want of a checkpoint.
    (Before, `make ui` was printed without the checkpoint and the audit called the
    embedding's partitions unknown.)"""
    from agrifm_pipeline.demo import demo_env

    out = demo_run.out
    sha = re.search(r"checkpoint: .* sha256 ([0-9a-f]{16})… untrained=True", out)
    assert sha, out
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {*DEMO_SETTINGS, *demo_env(), "DAGSTER_HOME"}
    }
    env |= {
        "RS_EMBED_AGRIFM_AUTO_DOWNLOAD": "0",  # offline: no download, nothing cached
        "RS_EMBED_AGRIFM_CACHE_DIR": str(tmp_path / "empty-cache"),
    }

    ui = _printed(out, " ui CHECKPOINT=")
    assert "CHECKPOINT=untrained:0" in ui and f"DAGSTER_HOME={demo_run.dir / 'dagster'}" in ui
    report = tmp_path / "dagster_dev.json"
    stand_in = tmp_path / "dagster"
    stand_in.write_text(
        f"#!/bin/sh\nexec {sys.executable} - \"$@\" <<'EOF'\n"
        "import json, os, sys\n"
        "from agrifm_pipeline.definitions import defs\n"
        "from agrifm_pipeline.defs.staleness import checkpoint_state\n"
        "sha, source, problem = checkpoint_state(defs.resources['model'])\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "           'DAGSTER_HOME': os.environ.get('DAGSTER_HOME'),\n"
        "           'chip_px': defs.resources['tile_year'].chip_px,\n"
        "           'sha': sha, 'problem': problem},\n"
        f"          open({str(report)!r}, 'w'))\n"
        "EOF\n"
    )
    stand_in.chmod(0o755)
    done = subprocess.run(
        f"{ui} PORT=3001 DAGSTER_BIN={stand_in}",
        shell=True,
        cwd=demo_run.dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(report.read_text())
    assert seen["argv"] == ["dev", "-w", "workspace.yaml", "-p", "3001"], seen
    assert seen["DAGSTER_HOME"] == str(demo_run.dir / "dagster")
    assert seen["chip_px"] == 64  # the demo's grid, from demo.env
    assert seen["problem"] is None and str(seen["sha"]).startswith(sha.group(1)), seen

    # The commands that open the mosaic (but gdalinfo: a system GDAL >= 3.10 may be absent).
    (xarray,) = [ln.strip() for ln in out.splitlines() if f"{sys.executable} -c" in ln]
    for command, says in ((xarray, "embedding"), (_printed(out, " info 'ZARR:"), '"count": 1024')):
        done = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0 and says in done.stdout, (command, done.stderr)

    audit = _printed(out, " audit")
    done = subprocess.run(
        audit, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [ln.split("|") for ln in done.stdout.splitlines() if ln.count("|") > 3]
    header, rows = [c.strip() for c in table[0]], table[1:]
    status = header.index("status")
    # One row per stored partition: the tile's tile-year assets and the region's products.
    from agrifm_pipeline import stages

    asset = header.index("asset")
    want = {s.asset for s in (*stages.TILE_YEAR, *stages.REGION_PRODUCTS)}
    assert {r[asset].strip() for r in rows} == want, done.stdout
    assert len(rows) == len(want), done.stdout
    assert {r[status].strip() for r in rows} == {"current"}, done.stdout
    assert f"current checkpoint {sha.group(1)}…" in done.stderr, done.stderr


def test_home_sets_pool_limits(tmp_path, monkeypatch, capsys) -> None:
    import dagster as dg

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert main(["home"]) == 0
    assert "agrifm_encoder=1" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        info = instance.event_log_storage.get_concurrency_info("agrifm_encoder")
    assert info.slot_count == 1


def test_audit_finds_the_home_and_never_creates_one(tmp_path, monkeypatch, capsys) -> None:
    """Run where no home is, the audit names where it looked and creates nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("AGRIFM_PIPELINE_HOME", raising=False)
    assert main(["audit"]) == 2
    err = capsys.readouterr().err
    assert "no Dagster instance at" in err and str(tmp_path / ".agrifm" / "dagster") in err
    assert not (tmp_path / ".agrifm").exists()


def test_roi_demo_never_falls_back_to_untrained_weights(tmp_path, monkeypatch, capsys) -> None:
    """No checkpoint, nothing cached, no download allowed: an error that says how to ask."""
    monkeypatch.delenv("RS_EMBED_AGRIFM_CKPT", raising=False)
    monkeypatch.setenv("RS_EMBED_AGRIFM_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("RS_EMBED_AGRIFM_AUTO_DOWNLOAD", "0")
    assert main(["roi-demo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint untrained:0" in err and "UNTRAINED weights, as asked" not in err


def test_help_lists_every_command(capsys) -> None:
    from agrifm_pipeline.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"    {name} " in out or f"    {name}\n" in out, name


def test_readme_opens_with_the_two_commands_and_names_real_commands() -> None:
    from agrifm_pipeline.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    head = readme.split("\n")[:15]
    assert any(line.startswith("make test") for line in head)
    assert any(line.startswith("make demo") for line in head)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    named = set(re.findall(r"agrifm-pipeline ([a-z][a-z-]+)", readme))
    assert named and named <= set(sub.choices), named - set(sub.choices)  # type: ignore[arg-type]
    for doc in re.findall(r"\]\((docs/[\w./-]+)\)", readme):  # the documents it links exist
        assert (Path(__file__).resolve().parents[1] / doc).is_file(), doc


def test_progress_moves_with_the_encoder_and_finishes(capsys) -> None:
    """Plain lines (not a terminal) that count steps and chips while a step encodes."""
    import time

    import dagster as dg
    import torch

    from agrifm_pipeline.demo import _run_with_progress
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions

    tiny = Path(__file__).resolve().parent / "fixtures" / "agrifm" / "tiny_p444.pth"
    engine = EmbeddingEngine.create(str(tiny), options=InferenceOptions(device="cpu", batch_size=1))

    @dg.op
    def encode() -> None:
        for _ in range(3):  # one chip at a time, slower than the display polls
            engine.embed(torch.zeros(1, 4, 10, 32, 32))
            time.sleep(1.5)

    @dg.job
    def chips_job() -> None:
        encode()

    with dg.instance_for_test() as instance:
        result = _run_with_progress(chips_job, instance, "test", chips=3)
    assert result.success
    out = capsys.readouterr().out
    assert re.search(r"step 0/1, running encode, chips [12]/3", out), out
    assert "finished, 1 steps (100 %)" in out.splitlines()[-1]
