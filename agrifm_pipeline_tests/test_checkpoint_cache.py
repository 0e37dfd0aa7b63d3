"""A checkpoint given as a URL: one download per node, whatever the number of processes.

Six processes resolve the same URL at once against a real HTTP server on 127.0.0.1;
the server sees one GET, every process gets the same file and sha256, and the cached
file is mode 0644. A pinned URL (``#sha256=``) is known to the sensors without the
weights; a download that does not match its pin is refused.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from agrifm_pipeline.checkpoint import (
    parse_url_spec,
    resolve_checkpoint,
    url_cache_dir,
)
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.settings import load_settings

TINY = Path(__file__).resolve().parent / "fixtures" / "agrifm" / "tiny_p444.pth"


class _Server:
    def __init__(self, body: bytes, delay_s: float) -> None:
        self.gets: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets.append(self.path)
                time.sleep(delay_s)  # long enough for every process to be waiting on it
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def weights_server() -> Iterator[_Server]:
    server = _Server(TINY.read_bytes(), delay_s=1.0)
    yield server
    server.close()


def _settings(cache: Path):  # type: ignore[no-untyped-def]
    return load_settings().replace(cache_dir=cache, ckpt_min_bytes=0, auto_download=True)


def _resolve_in_child(spec: str, cache: str, barrier, out) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()  # all six ask at the same moment
    r = resolve_checkpoint(spec, _settings(Path(cache)))
    out.put((r.source, str(r.path), r.sha256))


def test_six_processes_one_download(weights_server: _Server, tmp_path: Path) -> None:
    spec = f"{weights_server.url}/weights/AgriFM.pth"
    ctx = mp.get_context("fork")  # the children only fetch and hash: no torch work
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [
        ctx.Process(target=_resolve_in_child, args=(spec, str(tmp_path), barrier, out))
        for _ in range(6)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert weights_server.gets == ["/weights/AgriFM.pth"]  # one GET for six processes
    sha = hashlib.sha256(TINY.read_bytes()).hexdigest()
    assert {r[2] for r in results} == {sha}
    assert sorted(r[0] for r in results) == ["cache"] * 5 + ["download"]
    (path,) = {r[1] for r in results}
    assert Path(path).parent == url_cache_dir(spec, _settings(tmp_path))
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o644
    assert Path(path).read_bytes() == TINY.read_bytes()
    assert not [p for p in Path(path).parent.iterdir() if ".part-" in p.name]


def test_pinned_url_is_known_without_the_weights(weights_server: _Server, tmp_path: Path) -> None:
    sha = hashlib.sha256(TINY.read_bytes()).hexdigest()
    spec = f"{weights_server.url}/AgriFM.pth#sha256={sha}"
    assert parse_url_spec(spec) == (f"{weights_server.url}/AgriFM.pth", sha)
    offline = _settings(tmp_path).replace(auto_download=False)
    r = resolve_checkpoint(spec, offline)
    assert (r.source, r.sha256, r.path) == ("pinned", sha, None)
    assert weights_server.gets == []  # judged from the pin: nothing fetched
    # Unpinned and not on the node: a clear error, still nothing fetched.
    with pytest.raises(CheckpointError, match="pin it as"):
        resolve_checkpoint(f"{weights_server.url}/AgriFM.pth", offline)
    assert weights_server.gets == []
    # The run's node downloads it and checks it against the pin.
    r = resolve_checkpoint(spec, _settings(tmp_path))
    assert (r.source, r.sha256) == ("download", sha)
    wrong = f"{weights_server.url}/other/AgriFM.pth#sha256={'0' * 64}"
    with pytest.raises(CheckpointError, match="not the pinned"):
        resolve_checkpoint(wrong, _settings(tmp_path))
    assert not (url_cache_dir(wrong.split("#")[0], _settings(tmp_path)) / "AgriFM.pth").exists()


def test_sensor_records_a_pinned_checkpoint_without_the_weights(
    weights_server: _Server, tmp_path: Path, monkeypatch
) -> None:
    from agrifm_pipeline.defs.resources import AgriFMModel
    from agrifm_pipeline.defs.sensors import checkpoint_sensor

    monkeypatch.setenv("RS_EMBED_AGRIFM_CACHE_DIR", str(tmp_path / "daemon-cache"))
    sha = "ab" * 32
    model = AgriFMModel(checkpoint=f"{weights_server.url}/AgriFM.pth#sha256={sha}")
    with dg.build_sensor_context(resources={"model": model}) as ctx:
        result = checkpoint_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    assert result.cursor == sha
    (req,) = result.run_requests
    # The observation it requests reads the pin too, and downloads nothing.
    from agrifm_pipeline_tests.test_staleness import run_observation

    with dg.instance_for_test() as instance:
        obs = run_observation(req, model, instance)
    assert obs.metadata["sha256"].value == sha and obs.metadata["source"].value == "pinned"
    assert obs.tags["dagster/data_version"] == sha
    assert weights_server.gets == []


def test_url_fragments_other_than_a_pin_are_refused() -> None:
    with pytest.raises(CheckpointError, match="#sha256="):
        parse_url_spec("https://example.org/AgriFM.pth#md5=abc")
    assert parse_url_spec("s3://bucket/AgriFM.pth") == ("s3://bucket/AgriFM.pth", None)
    assert parse_url_spec("/data/AgriFM.pth") is None


def test_s3_url_is_fetched_once_into_the_node_cache(s3_server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import s3fs

    bucket = s3_server.bucket()
    s3fs.S3FileSystem(**s3_server.options()).pipe(f"{bucket}/weights/AgriFM.pth", TINY.read_bytes())
    # The node reaches object storage the standard way: AWS_* variables (or a profile).
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"s3://{bucket}/weights/AgriFM.pth"
    r = resolve_checkpoint(url, _settings(tmp_path))
    assert r.source == "download" and r.sha256 == hashlib.sha256(TINY.read_bytes()).hexdigest()
    assert stat.S_IMODE(r.path.stat().st_mode) == 0o644  # type: ignore[union-attr]
    assert resolve_checkpoint(url, _settings(tmp_path)).source == "cache"
    with pytest.raises(CheckpointError, match="no such object"):
        resolve_checkpoint(f"s3://{bucket}/missing.pth", _settings(tmp_path))


def test_untrained_weights_are_made_once_per_node(tmp_path: Path) -> None:
    """The full encoder's untrained weights take seconds to generate: the first process
    writes them to the node cache (mode 0644) and the others map that file; the values
    are the generated ones exactly, and a damaged cached file is made again."""
    import torch

    from agrifm_pipeline.model.config import EncoderConfig
    from agrifm_pipeline.model.weights import untrained_state_dict, untrained_tensors

    settings = load_settings().replace(cache_dir=tmp_path / "cache")
    made = untrained_tensors(3, (4, 2, 2), settings)
    (cached,) = (tmp_path / "cache" / "untrained").glob("seed3-p422-*.pt")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o644
    again = untrained_tensors(3, (4, 2, 2), settings)
    expected = untrained_state_dict(3, EncoderConfig(patch_size=(4, 2, 2)))
    assert again.keys() == made.keys() == expected.keys()
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    cached.write_bytes(b"not a checkpoint")
    repaired = untrained_tensors(3, (4, 2, 2), settings)
    assert all(torch.equal(repaired[k], expected[k]) for k in expected)
    assert cached.stat().st_size > 1000  # replaced by the real thing
