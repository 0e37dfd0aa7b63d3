"""The per-year index: what judging reads, one object per asset and year, on every store.

The pointer stays the truth; the index is entered after it and can lag a commit,
never lead one. These tests pin what readers see when it lags, when a partition is
deleted by hand, and when concurrent commits race to enter it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import xarray as xr

from agrifm_pipeline.lineage import is_record, lineage_record, scene_index_record
from agrifm_pipeline.storage import INDEX, INDEX_SHARDS, IndexedReader, ZarrStore, index_shard
from agrifm_pipeline_tests.object_store import StoreKind, child_script

TILES = [f"32631_640m_E{e:04d}_N8784" for e in range(890, 898)]


def _grid(value: float) -> xr.Dataset:
    return xr.Dataset({"embedding": (("y", "x"), np.full((4, 4), value, "float32"))})


def _lineage(tile: str, setting: float) -> dict:
    return {
        "stage": "embedding",
        "tile": tile,
        "run_id": f"run-{setting}",
        "settings": {"n_frames": 8, "norm_mode": "agrifm_stats", "image_size": 224, "seed": 3},
        "fingerprints": {
            "embedding": {"fingerprint": f"fp{setting}", "inputs": {"checkpoint_sha256": "a" * 64}}
        },
        "inputs": {"frames": {"version": "v1", "url": "s3://b/frames", "run_id": "r"}},
        "embedding": {"checkpoint": {"sha256": "a" * 64, "source": "cache"}},
        "acquisition": {"scene_index": scene_index_record({f"S2A_{i}": "t" for i in range(40)})},
    }


def _count_reads(store: ZarrStore, monkeypatch) -> dict[str, int]:
    """Pointer and manifest reads made through ``store``'s class from now on."""
    counts = {"pointer": 0, "manifest": 0}
    cls = type(store)
    pointer, manifest = cls.pointer, cls.manifest

    def counted_pointer(self, *a, **k):  # type: ignore[no-untyped-def]
        counts["pointer"] += 1
        return pointer(self, *a, **k)

    def counted_manifest(self, *a, **k):  # type: ignore[no-untyped-def]
        counts["manifest"] += 1
        return manifest(self, *a, **k)

    monkeypatch.setattr(cls, "pointer", counted_pointer)
    monkeypatch.setattr(cls, "manifest", counted_manifest)
    return counts


def test_a_commit_enters_its_pointer_in_the_years_index(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    v = {t: store.write(2019, t, _grid(i), _lineage(t, i)) for i, t in enumerate(TILES[:3])}
    store.write(2020, TILES[0], _grid(9), _lineage(TILES[0], 9))
    idx = store.index(2019)
    assert idx is not None and sorted(idx) == TILES[:3]
    for t in TILES[:3]:
        cur = store.current(2019, t)
        assert idx[t].id == cur.id == v[t].id
        assert idx[t].manifest_sha256 == cur.manifest_sha256 and idx[t].summary == cur.summary
    assert sorted(store.index(2020) or {}) == [TILES[0]] and store.index(2021) is None
    # What it keeps of the lineage is a record: small, no scene list, no fingerprint inputs.
    rec = idx[TILES[1]].summary
    assert is_record(rec) and rec == lineage_record(_lineage(TILES[1], 1))
    assert rec["acquisition"]["scene_index"] == {
        "digest": _lineage(TILES[1], 1)["acquisition"]["scene_index"]["digest"],
        "n_scenes": 40,
    }
    assert "inputs" not in rec["fingerprints"]["embedding"]
    assert rec["settings"] == {"n_frames": 8, "norm_mode": "agrifm_stats", "image_size": 224}
    assert len(json.dumps(rec)) < 700
    # Each commit rewrites one shard of the year's index.
    assert index_shard(TILES[1]) in range(INDEX_SHARDS)
    # A newer commit replaces the entry; the history stays in the pointer only.
    v2 = store.write(2019, TILES[1], _grid(5), _lineage(TILES[1], 5))
    assert store.index(2019)[TILES[1]].id == v2.id  # type: ignore[index]


def test_a_reader_reads_one_index_and_one_listing_per_year(store_kind, monkeypatch) -> None:
    store = store_kind.zarr()
    for i, t in enumerate(TILES):
        store.write(2019, t, _grid(i), _lineage(t, i))
    counts = _count_reads(store, monkeypatch)
    reader = IndexedReader(store)
    got = {t: reader.current(2019, t) for t in TILES}
    assert {t: v.id for t, v in got.items()} == {t: store.index(2019)[t].id for t in TILES}  # type: ignore[index]
    assert counts == {"pointer": 0, "manifest": 0}
    # Shard by shard, each once (never the whole index at once), and one listing.
    assert reader.reads["listing"] == 1 and reader.reads["index"] == 0
    assert reader.reads["shard"] == len({0, *(index_shard(t) for t in TILES)})
    assert reader.current(2018, TILES[0]) is None and reader.current(2019, "32631_640m_X") is None


def test_a_reader_reads_only_the_shards_of_what_it_judges(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.index_size_hint = lambda: 100_000  # 128 shards: a continent-year's layout
    tiles = [f"32631_640m_E{e:04d}_N8784" for e in range(890, 1090)]
    for i, t in enumerate(tiles):
        store.write(2019, t, _grid(i), _lineage(t, i))
    window = tiles[:5]
    reader = IndexedReader(store)
    reader.load(2019, window)  # one batch
    assert reader.reads["shard"] == len({0, *(index_shard(t, 128) for t in window)}) <= 6
    assert all(reader.current(2019, t).id == store.current(2019, t).id for t in window)  # type: ignore[union-attr]
    assert reader.reads["shard"] <= 6 and reader.reads["index"] == 0
    # What is not in a shard read so far is read when asked for.
    assert reader.current(2019, tiles[-1]).id == store.current(2019, tiles[-1]).id  # type: ignore[union-attr]


def test_a_partition_deleted_by_hand_is_gone_for_the_reader(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    for i, t in enumerate(TILES[:3]):
        store.write(2019, t, _grid(i), _lineage(t, i))
    store._rm_tree(store.partition_path(2019, TILES[1]))  # the index still names it
    assert TILES[1] in (store.index(2019) or {})
    reader = IndexedReader(store)
    assert reader.current(2019, TILES[1]) is None
    assert [p.tile for p in reader.partitions()] == [TILES[0], TILES[2]]


def test_a_long_lived_reader_lists_what_other_clients_wrote_since(store_kind: StoreKind) -> None:
    """A sensor's store lives for days: its listings of years and partitions are made
    anew each time, so a year and a tile another client wrote after its first look are
    seen (on S3 the writer is a separate client, with its own listing cache)."""
    store = store_kind.zarr()
    store.write(2019, TILES[0], _grid(0), _lineage(TILES[0], 0))
    assert store.years() == ["2019"]
    assert [p.tile for p in IndexedReader(store).partitions()] == [TILES[0]]
    options = store_kind.storage_options
    other = ZarrStore(
        store_kind.root,
        "grid",
        storage_options={**options, "skip_instance_cache": True} if options else {},
        commit_lock=store_kind.commit_lock,
    )
    other.write(2020, TILES[1], _grid(1), _lineage(TILES[1], 1))
    other.write(2019, TILES[2], _grid(2), _lineage(TILES[2], 2))
    assert store.years() == ["2019", "2020"]
    assert [(p.year, p.tile) for p in IndexedReader(store).partitions()] == [
        ("2019", TILES[0]),
        ("2019", TILES[2]),
        ("2020", TILES[1]),
    ]


def test_an_index_behind_its_pointer_is_caught_by_what_dagster_recorded(
    store_kind: StoreKind,
) -> None:
    """A writer killed between its pointer and its index entry (or a lost update on a
    store without conditional writes) leaves the index behind: a reader told the
    version Dagster recorded reads the pointer, and enters it again."""
    store = store_kind.zarr()
    store.write(2019, TILES[0], _grid(1), _lineage(TILES[0], 1))
    shard = store.index_path(2019, index_shard(TILES[0]))
    stale_index = store.documents.read(shard)[0]
    v2 = store.write(2019, TILES[0], _grid(2), _lineage(TILES[0], 2))
    store._put(shard, json.dumps(stale_index).encode())  # never entered
    assert store.index(2019)[TILES[0]].id != v2.id  # type: ignore[index]
    # Trusted without news of a change; read from the pointer with it.
    assert IndexedReader(store).current(2019, TILES[0]).id != v2.id  # type: ignore[union-attr]
    reader = IndexedReader(store, {("2019", TILES[0]): v2.id})
    assert reader.current(2019, TILES[0]).id == v2.id  # type: ignore[union-attr]
    assert reader.reads["pointer"] == 1 and reader.reads["repaired"] == 1
    assert store.index(2019)[TILES[0]].id == v2.id  # type: ignore[index]
    # The audit's reader reads every pointer and repairs too.
    store._put(shard, json.dumps(stale_index).encode())
    audit = IndexedReader(store, pointers=True)
    assert audit.current(2019, TILES[0]).id == v2.id  # type: ignore[union-attr]
    assert audit.reads["repaired"] == 1 and store.index(2019)[TILES[0]].id == v2.id  # type: ignore[index]


def test_a_year_without_index_is_indexed_once(store_kind: StoreKind) -> None:
    """Stores written before indexes existed, or an index damaged or deleted."""
    store = store_kind.zarr()
    for i, t in enumerate(TILES[:4]):
        store.write(2019, t, _grid(i), _lineage(t, i))
    store._rm_tree(store.index_path(2019))
    assert store.index(2019) is None
    reader = IndexedReader(store)
    assert sorted(v.tile for v in map(lambda t: reader.current(2019, t), TILES[:4])) == TILES[:4]
    assert sorted(store.index(2019) or {}) == TILES[:4]
    store._put(store.index_path(2019, 5), b"{not json")  # one shard damaged
    assert store.index(2019) is None and store.rebuild_index() == 4
    assert sorted(store.index(2019) or {}) == TILES[:4]


def test_integrity_verdicts_reach_the_index(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    v = store.write(2019, TILES[0], _grid(1), _lineage(TILES[0], 1))
    store.mark_integrity(v, [])
    entry = store.index(2019)[TILES[0]]  # type: ignore[index]
    assert entry.integrity is not None and entry.integrity["ok"] is True


INDEX_WRITER = """
store = zarr()
setting = int(sys.argv[1])
for i in range({n}):
    tile = f"32631_640m_E{{setting:02d}}{{i:02d}}_N8784"
    store.write(2019, tile, __import__("xarray").Dataset(), {{"run_id": str(setting)}})
print("done")
"""


def test_concurrent_commits_all_reach_the_index(process_store_kind: StoreKind) -> None:
    """Writers in separate processes commit different partitions of one year at once;
    every commit is in the index where commits are serialised or conditional (a local
    directory with its lock, S3 with conditional writes)."""
    n = 5
    writers = [
        subprocess.Popen(
            [*child_script(process_store_kind, INDEX_WRITER.format(n=n)), str(setting)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for setting in (1, 2, 3)
    ]
    for w in writers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0 and "done" in out
    store = process_store_kind.zarr()
    pointers = {p.tile for p in store.partitions()}
    assert len(pointers) == 3 * n
    indexed = set(store.index(2019) or {})
    if process_store_kind.name != "local-nolock":
        assert indexed == pointers
    else:  # last writer wins: entries may be lost, and a reader with news repairs them
        assert indexed <= pointers
    news = {("2019", t): store.current(2019, t).id for t in pointers}  # type: ignore[union-attr]
    reader = IndexedReader(store, news)
    assert {t for t in pointers if reader.current(2019, t) is not None} == pointers
    assert set(store.index(2019) or {}) == pointers


def test_index_file_is_not_a_partition(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILES[0], _grid(1), _lineage(TILES[0], 1))
    shards = sorted((tmp_path / "grid.zarr" / "2019" / INDEX).glob("*.json"))
    assert len(shards) == INDEX_SHARDS
    assert all(json.loads(p.read_text())["complete"] for p in shards)
    assert [p.tile for p in store.partitions()] == [TILES[0]]


def test_verify_rewrites_the_indexes(tmp_path: Path, capsys) -> None:
    from agrifm_pipeline.cli import main

    store = ZarrStore(tmp_path / "store", "agrifm_embedding_grid")
    for i, t in enumerate(TILES[:3]):
        store.write(2019, t, _grid(i), _lineage(t, i))
    Path(store.index_path(2019, 3)).write_text("[]")  # damaged
    assert store.index(2019) is None
    assert main(["verify", "--store", str(tmp_path / "store")]) == 0
    assert "3 partition(s) indexed" in capsys.readouterr().err
    assert sorted(store.index(2019) or {}) == TILES[:3]


def test_threads_of_one_process_lose_no_index_entry(store_kind: StoreKind) -> None:
    """POSIX locks keep other processes out, not other threads: the acquisition step's
    threads commit partitions of one year at once, and every one reaches the index (it
    used to lose one now and then, which the stale sensor took for a missing partition)."""
    from concurrent.futures import ThreadPoolExecutor

    store = store_kind.zarr()
    store.write(2019, TILES[0], _grid(0), _lineage(TILES[0], 0))  # the year's index exists
    # Twelve tiles of one shard, so that every commit races on the same document.
    candidates = [f"32631_640m_E{e:04d}_N{n:04d}" for e in range(20) for n in range(40)]
    work = [t for t in candidates if index_shard(t) == 7][:12]
    assert len(work) == 12
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: store.write(2019, t, _grid(1), _lineage(t, 1)), work))
    assert set(work) <= set(store.index(2019) or {})


def test_a_years_shards_grow_with_what_it_holds() -> None:
    from agrifm_pipeline.storage import PER_SHARD, shards_for

    assert shards_for(0) == shards_for(8 * PER_SHARD) == INDEX_SHARDS
    assert shards_for(8 * PER_SHARD + 1) == 16
    assert shards_for(125_316) == 128  # a continent-year: ~980 partitions a shard
    assert shards_for(10**9) == 1024
    # A tile's shard under 2N is its shard under N, or that plus N.
    for t in TILES:
        assert index_shard(t, 16) % 8 == index_shard(t, 8)


def test_a_years_index_is_sized_for_the_hint_and_resized_by_a_rebuild(
    store_kind: StoreKind,
) -> None:
    from agrifm_pipeline.storage import _INDEXED_YEARS

    store = store_kind.zarr()
    store.index_size_hint = lambda: 20_000  # e.g. the registered tiles
    for i, t in enumerate(TILES[:4]):
        store.write(2019, t, _grid(i), _lineage(t, i))
    heads = [json.loads(store._read(store.index_path(2019, i)) or b"{}") for i in range(32)]
    assert {h["of"] for h in heads} == {32} and all(h["complete"] for h in heads)
    assert sorted(store.index(2019) or {}) == TILES[:4]
    # verify's rebuild sizes it for what it holds: back to 8; the 24 others are gone.
    store.index_size_hint = None
    assert store.rebuild_index(2019) == 4
    assert store._read(store.index_path(2019, 8)) is None
    # A writer that still knew 32 shards finds out and enters its partition under 8.
    _INDEXED_YEARS[(store.url, "2019")] = 32
    v = store.write(2019, TILES[4], _grid(4), _lineage(TILES[4], 4))
    idx = store.index(2019)
    assert idx is not None and sorted(idx) == TILES[:5] and idx[TILES[4]].id == v.id
    assert _INDEXED_YEARS[(store.url, "2019")] == 8


def test_shards_of_two_layouts_are_no_index(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    for i, t in enumerate(TILES[:3]):
        store.write(2019, t, _grid(i), _lineage(t, i))
    path = Path(store.index_path(2019, 3))
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "of": 16}))
    assert store.index(2019) is None  # only a cache: the readers rebuild it
    reader = IndexedReader(store)
    assert sorted(reader.index(2019) or {}) == TILES[:3]
    assert {json.loads(p.read_text())["of"] for p in path.parent.glob("*.json")} == {8}


def test_a_shard_removed_by_hand_is_made_again_by_the_next_commit(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILES[0], _grid(0), _lineage(TILES[0], 0))
    Path(store.index_path(2019, index_shard(TILES[1]))).unlink()
    v = store.write(2019, TILES[1], _grid(1), _lineage(TILES[1], 1))
    idx = store.index(2019)
    assert idx is not None and sorted(idx) == TILES[:2] and idx[TILES[1]].id == v.id


def test_an_index_of_an_earlier_layout_is_rebuilt_not_misread(tmp_path: Path) -> None:
    from agrifm_pipeline.storage import shard_key

    # A block's tiles share a shard; names that are not tile ids are their own key.
    assert shard_key(TILES[0]) == shard_key(TILES[5]) == "32631_640m_8x8_E0111_N1098"
    assert len({index_shard(t, 1024) for t in TILES[:6]}) == 1
    assert shard_key("france") == "france"
    store = ZarrStore(tmp_path, "grid")
    v = {t: store.write(2019, t, _grid(i), _lineage(t, i)) for i, t in enumerate(TILES)}
    for path in Path(store.index_path(2019)).glob("*.json"):  # as an older release wrote it
        doc = json.loads(path.read_text())
        doc.pop("layout")
        path.write_text(json.dumps(doc))
    assert store.index(2019) is None
    reader = IndexedReader(store)
    assert {t: reader.current(2019, t).id for t in TILES} == {t: x.id for t, x in v.items()}  # type: ignore[union-attr]
    assert store.index(2019) is not None  # rebuilt in the current layout
