"""The feature store: round trip, atomic completion, crashes, concurrent writers, identity, verify, failures, HDF5."""
import dataclasses
import inspect
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from epicfeat.hdf5 import export_hdf5
from epicfeat.store import (
    FLUSH_CHUNKS,
    NUMERIC_SETTINGS,
    ClaimLostError,
    FeatureSetIdentity,
    FeatureStore,
    StoreError,
    feature_chunk_rows,
)

REPO = Path(__file__).resolve().parent.parent
SOURCE = {"source_path": "/videos/P01/P01_01.MP4", "source_fps": 59.94, "duration": 30.0, "width": 640,
          "height": 360}


RUN_SETTINGS = dict(decoder="pyav-18.1.0-libavcodec-62.28.102", device="cpu-AVX512", tf32=False, batch_size=64,
                    channels_last=True, compile=False, fold_bn=True)


def identity(**changes) -> FeatureSetIdentity:
    base = FeatureSetIdentity(weights="random-seed0", weights_sha="0123456789abcdef", fps=10.0, resize=128,
                              crop=112, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **RUN_SETTINGS)
    return dataclasses.replace(base, **changes)


def make_rows(rows: int, seed: int, dim: int = 2048, dtype=np.float16):
    """Deterministic rows of one video: features, pts at 10 rows/s of a 59.94 fps source, frame indices."""
    rng = np.random.default_rng(seed)
    features = (rng.standard_normal((rows, dim)) * 10).astype(dtype)  # (rows, dim)
    frames = np.round(np.arange(rows) * 5.994).astype(np.int64)  # (rows,)
    pts = frames / 59.94  # (rows,) seconds
    return features, pts, frames


def write_video(store, video_id, rows, *, seed=0, batch=50, attrs=None, **writer_kwargs):
    features, pts, frames = make_rows(rows, seed, store.identity.feature_dim, store.identity.dtype)
    attrs = attrs or {**SOURCE, "duration": rows / 10}  # 10 rows per second of video, as verify expects
    with store.writer(video_id, attrs=attrs, **writer_kwargs) as writer:
        for start in range(0, rows, batch):
            writer.append(features[start : start + batch], pts[start : start + batch], frames[start : start + batch])
        writer.commit()
    return features, pts, frames


@pytest.fixture
def store(tmp_path):
    return FeatureStore.create(tmp_path / "cache", identity())


# -------------------------------------------------------------------------------------------- round trip
def test_writer_round_trip(store):
    features, pts, frames = write_video(store, "P01_01", 600, batch=64)  # 2 whole chunks + 88 rows
    video = store.read("P01_01")
    assert isinstance(video.features, zarr.Array)  # lazy: callers slice it
    assert video.features.shape == (600, 2048) and video.rows == 600
    assert video.features.dtype == np.float16
    assert video.features.chunks == (256, 2048)  # 1 MiB
    np.testing.assert_array_equal(video.features[:], features)
    np.testing.assert_array_equal(video.features[250:260], features[250:260])
    assert video.pts.dtype == np.float64 and video.frame_indices.dtype == np.int64
    np.testing.assert_array_equal(video.pts, pts)
    np.testing.assert_array_equal(video.frame_indices, frames)
    for key, value in {**SOURCE, "duration": 60.0}.items():
        assert video.attrs[key] == value
    assert video.attrs["rows"] == 600 and video.attrs["complete"] is True
    provenance = video.attrs["provenance"]
    assert provenance["weights"] == "random-seed0" and provenance["weights_sha"] == "0123456789abcdef"
    assert provenance["preprocessing"] == {"fps": 10.0, "resize": 128, "crop": 112,
                                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert "epicfeat_version" in provenance
    assert store.complete_videos() == ["P01_01"] and store.is_complete("P01_01")
    assert store.partial_videos() == []
    assert store.verify() == []
    assert list((store.path / ".partial").iterdir()) == [] and list((store.path / ".claims").iterdir()) == []


def test_writer_writes_whole_chunks_and_keeps_only_a_few_in_memory(store):
    features, pts, frames = make_rows(1100, seed=1)
    with store.writer("P01_02", attrs=SOURCE) as writer:
        writer.append(features[:1000], pts[:1000], frames[:1000])
        assert zarr.open_group(writer.folder, mode="r")["features"].shape == (0, 2048)  # still buffered
        writer.append(features[1000:], pts[1000:], frames[1000:])
        on_disk = zarr.open_group(writer.folder, mode="r")
        assert FLUSH_CHUNKS * writer.chunk_rows == 1024
        assert on_disk["features"].shape == (1024, 2048)  # four whole chunks written, 76 rows wait
        assert on_disk["features"].nchunks_initialized == 4
        assert on_disk["pts"].shape == (1024,) and on_disk["frame_index"].shape == (1024,)
        assert writer.rows == 1100
        assert not store.is_complete("P01_02") and store.partial_videos() == ["P01_02"]  # live writer: partial
        writer.commit()
    np.testing.assert_array_equal(store.read("P01_02").features[:], features)


@pytest.mark.parametrize("dim, dtype, chunk_rows", [(768, "float16", 512), (1024, "float32", 256), (6, "float16", 65536)])
def test_any_feature_width_is_stored_in_chunks_of_about_one_mib(tmp_path, dim, dtype, chunk_rows):
    store = FeatureStore.create(tmp_path / "cache", identity(feature_dim=dim, dtype=dtype))
    features, pts, frames = write_video(store, "P01_01", 1300, batch=100)
    video = store.read("P01_01")
    assert video.features.chunks == (chunk_rows, dim) and feature_chunk_rows(dim, dtype) == chunk_rows
    assert 0.5 * 2**20 < chunk_rows * dim * np.dtype(dtype).itemsize <= 2**20 or dim == 6
    assert video.features.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(video.features[:], features)
    assert store.verify() == []
    out = export_hdf5(store, tmp_path / "features.h5")
    with h5py.File(out, "r") as h5:
        assert h5["videos/P01_01/features"].chunks == (chunk_rows, dim)
        np.testing.assert_array_equal(h5["videos/P01_01/features"][:], features)


def test_append_rejects_mismatched_shapes(store):
    with store.writer("P01_01", attrs=SOURCE) as writer:
        with pytest.raises(StoreError, match=r"features \(n, 2048\)"):
            writer.append(np.zeros((3, 1024)), np.arange(3.0), np.arange(3))
        with pytest.raises(StoreError, match="P01_01"):
            writer.append(np.zeros((3, 2048)), np.arange(2.0), np.arange(3))


def test_zero_row_video_commits(store):
    with store.writer("P01_03", attrs={**SOURCE, "duration": 0.0}) as writer:
        writer.commit()
    video = store.read("P01_03")
    assert video.features.shape == (0, 2048) and len(video.pts) == 0 and video.attrs["rows"] == 0
    assert store.verify() == []


# ---------------------------------------------------------------------------------------- crash safety
def test_abandoned_writer_leaves_a_partial_video_and_no_complete_one(store):
    features, pts, frames = make_rows(400, seed=2)
    with pytest.raises(RuntimeError, match="decoder died"):
        with store.writer("P01_01", attrs=SOURCE) as writer:
            writer.append(features, pts, frames)
            raise RuntimeError("decoder died")
    assert store.complete_videos() == [] and not store.is_complete("P01_01")
    assert store.partial_videos() == ["P01_01"]
    with pytest.raises(StoreError, match="partially written"):
        store.read("P01_01")
    with pytest.raises(StoreError, match="closed"):
        writer.append(features, pts, frames)
    # Opening a new writer removes the abandoned folder; the redo completes.
    write_video(store, "P01_01", 400, seed=2)
    assert store.partial_videos() == [] and store.complete_videos() == ["P01_01"]
    assert list((store.path / ".partial").iterdir()) == []
    assert store.verify() == []


def test_a_video_has_one_live_writer_and_the_next_one_removes_leftovers(store):
    """Every writer holds the video's claim (no lock files): a second writer is refused while the first lives, and
    its folder is never touched; the folder of a writer that gave up is removed by the next claim holder."""
    features, pts, frames = make_rows(10, seed=3)
    first = store.writer("P01_01", attrs=SOURCE)
    first.append(features, pts, frames)
    with pytest.raises(StoreError, match="P01_01 is being written by another writer"):
        store.writer("P01_01", attrs=SOURCE)
    store.record_failure("P01_01", "listed twice")  # recorded, but the live writer's folder stays
    assert first.folder.is_dir()
    first.commit()
    assert store.read("P01_01").rows == 10 and store.failures() == {}
    gave_up = store.writer("P01_02", attrs=SOURCE)
    gave_up.close()
    assert store.partial_videos() == ["P01_02"]
    store.record_failure("P01_02", "gave up")  # a failed video is failed, not partial
    assert store.partial_videos() == [] and not gave_up.folder.exists()
    store.writer("P01_03", attrs=SOURCE).close()
    redo = store.writer("P01_03", attrs=SOURCE)
    assert list((store.path / ".partial").iterdir()) == [redo.folder]
    assert [p.name for p in (store.path / ".claims").iterdir()] == ["P01_03.claim"]
    redo.close()
    assert list((store.path / ".claims").iterdir()) == []


_CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from epicfeat.store import FeatureStore
{make_rows}
store_path, video_id, rows, seed, mode, go = sys.argv[1:]
rows, seed = int(rows), int(seed)
features, pts, frames = make_rows(rows, seed)
store = FeatureStore.open(store_path)
attrs = dict(source_path="x.MP4", source_fps=59.94, duration=rows / 10, width=640, height=360)
while go != "-" and not Path(go).exists():  # start together with the other writer
    time.sleep(0.005)
with store.writer(video_id, attrs=attrs) as writer:
    for start in range(0, rows, 40):
        writer.append(features[start:start + 40], pts[start:start + 40], frames[start:start + 40])
        if mode == "hang" and start >= 1100:
            print("mid-write", flush=True)
            time.sleep(120)  # the parent kills us here
        time.sleep(0.002)
    writer.commit()
print("done", flush=True)
"""


def _child(tmp_path: Path, store: FeatureStore, video_id: str, rows: int, seed: int, mode: str, go: str = "-"):
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(_CHILD.format(make_rows=textwrap.dedent(inspect.getsource(make_rows))))
    return subprocess.Popen([sys.executable, str(script), str(store.path), video_id, str(rows), str(seed), mode, go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_sigkill_mid_write_leaves_a_partial_that_is_redone(store, tmp_path):
    child = _child(tmp_path, store, "P02_01", 1500, seed=4, mode="hang")
    try:
        assert child.stdout.readline().strip() == "mid-write", child.stderr.read()
        assert any((store.path / ".partial").glob("P02_01.*/features/c/*/*"))  # chunks really are on disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert store.partial_videos() == ["P02_01"] and store.complete_videos() == []
    assert store.info()["videos_partial"] == 1
    features, pts, frames = write_video(store, "P02_01", 1500, seed=4)
    assert store.partial_videos() == [] and store.complete_videos() == ["P02_01"]
    assert list((store.path / ".partial").iterdir()) == []  # the dead writer's folder is gone
    np.testing.assert_array_equal(store.read("P02_01").features[:], features)
    assert store.verify() == []


def test_two_processes_write_different_videos_at_once(store, tmp_path):
    go = tmp_path / "go"
    children = [_child(tmp_path, store, video_id, rows, seed, "commit", str(go))
                for video_id, rows, seed in (("P03_01", 2600, 5), ("P03_02", 2100, 6))]
    time.sleep(0.3)
    go.touch()
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "done", err
    assert store.complete_videos() == ["P03_01", "P03_02"] and store.partial_videos() == []
    assert store.verify() == []
    for video_id, rows, seed in (("P03_01", 2600, 5), ("P03_02", 2100, 6)):
        features, pts, frames = make_rows(rows, seed)
        video = store.read(video_id)
        np.testing.assert_array_equal(video.features[:], features)
        np.testing.assert_array_equal(video.pts, pts)
        np.testing.assert_array_equal(video.frame_indices, frames)


def test_complete_video_is_refused_unless_overwrite(store):
    write_video(store, "P01_01", 30, seed=7)
    with pytest.raises(StoreError, match="already complete"):
        store.writer("P01_01", attrs=SOURCE)
    features, _, _ = write_video(store, "P01_01", 20, seed=8, overwrite=True)
    assert store.read("P01_01").rows == 20
    np.testing.assert_array_equal(store.read("P01_01").features[:], features)
    assert not any((store.path / ".trash").iterdir())
    assert store.verify() == []


def test_bad_video_id_is_refused(store):
    for bad in ("../P01_01", ".hidden", "", "P01/01"):
        with pytest.raises(StoreError, match="cannot be stored"):
            store.writer(bad, attrs=SOURCE)


# -------------------------------------------------------------------------------------------- identity
def test_key_is_readable_and_round_trips():
    ident = identity()
    key = ident.key()
    assert key.startswith("resnet50_random-seed0_fps10_r128c112_float16_")
    assert len(key.rsplit("_", 1)[1]) == 8
    again = FeatureSetIdentity.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert again == ident and again.key() == key
    assert identity(fps=None).key().startswith("resnet50_random-seed0_fpsall_")
    assert "/" not in identity(weights="file:/home/me/ft.pt").key()


def test_key_differs_for_any_field_change():
    base = identity()
    changed = {"weights": "imagenet1k_v2", "weights_sha": "fedcba9876543210", "fps": 5.0, "resize": 256,
               "crop": 224, "mean": (0.5, 0.456, 0.406), "std": (0.229, 0.224, 0.2), "interpolation": "bicubic",
               "backbone": "resnet101",
               "dtype": "float32", "feature_dim": 1024, "precision": "bf16",
               "decoder": "pyav-17.0.0-libavcodec-61.19.100", "device": "cuda-NVIDIA H200", "tf32": True,
               "batch_size": 256, "channels_last": False, "compile": True, "fold_bn": False, "source": "frames-epic",
               "clip_len": 16, "clip_fps": 15.0}
    assert set(changed) == {f.name for f in dataclasses.fields(FeatureSetIdentity)}  # every field is covered
    keys = {base.key()}
    for name, value in changed.items():
        keys.add(dataclasses.replace(base, **{name: value}).key())
    assert len(keys) == 1 + len(changed)
    assert identity(fps=10).key() == identity(fps=10.0).key()  # equal values, equal key


def test_every_run_setting_is_required():
    """No identity without its run settings: a set could otherwise share its folder with one run differently."""
    incomplete = {k: v for k, v in identity().to_dict().items() if k != "batch_size"}
    with pytest.raises(StoreError, match="incomplete.*batch_size"):
        FeatureSetIdentity.from_dict(incomplete)
    assert set(NUMERIC_SETTINGS) <= {f.name for f in dataclasses.fields(FeatureSetIdentity) if f.default is
                                     dataclasses.MISSING}
    assert identity(batch_size=64).key() != identity(batch_size=32).key()


def test_create_reopens_the_same_set_and_refuses_a_mismatch(tmp_path):
    cache = tmp_path / "cache"
    store = FeatureStore.create(cache, identity())
    write_video(store, "P01_01", 10)
    again = FeatureStore.create(cache, identity())
    assert again.path == store.path and again.complete_videos() == ["P01_01"]
    # A folder whose recorded identity differs from the requested one (renamed or edited by hand) is refused.
    marker = store.path / "featureset.json"
    meta = json.loads(marker.read_text())
    meta["identity"]["weights_sha"] = "not-the-same"
    marker.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="was requested"):
        FeatureStore.create(cache, identity())
    assert FeatureStore.open(store.path).verify()[0].startswith("feature set folder")


def test_open_and_list_sets(tmp_path):
    cache = tmp_path / "cache"
    assert FeatureStore.list_sets(cache) == []
    a = FeatureStore.create(cache, identity())
    b = FeatureStore.create(cache, identity(fps=5.0))
    assert [s.path for s in FeatureStore.list_sets(cache)] == sorted([a.path, b.path])
    assert FeatureStore.open(a.path).identity == identity()
    with pytest.raises(StoreError, match=a.path.name):  # a cache folder: the message lists its sets
        FeatureStore.open(cache)
    with pytest.raises(StoreError, match="not a feature set"):
        FeatureStore.open(tmp_path / "nowhere")
    assert not list(cache.glob(".*.tmp"))  # staging folders are gone


# ---------------------------------------------------------------------------------------------- verify
def test_verify_catches_nan_and_inf(store):
    features, pts, frames = make_rows(600, seed=9)
    features[300, 7] = np.nan
    features[301, 0] = np.inf
    with store.writer("P04_01", attrs={**SOURCE, "duration": 60.0}) as writer:
        writer.append(features, pts, frames)
        writer.commit()
    write_video(store, "P04_02", 40)
    assert store.verify() == ["P04_01: features hold NaN/inf in 2 rows (first: row 300)"]


def test_verify_catches_truncated_and_missing_data(store):
    write_video(store, "P04_01", 600)
    write_video(store, "P04_02", 600)
    write_video(store, "P04_03", 600)
    write_video(store, "P04_04", 50, attrs={"source_fps": 50.0})
    # truncated: the features array lost its last rows
    zarr.open_group(store.path / "videos" / "P04_01", mode="r+")["features"].resize((500, 2048))
    # a lost chunk file reads back as the NaN fill value
    (store.path / "videos" / "P04_02" / "features" / "c" / "1" / "0").unlink()
    # pts that go backwards
    group = zarr.open_group(store.path / "videos" / "P04_03", mode="r+")
    group["pts"][10] = 0.0
    problems = store.verify()
    assert problems == [
        "P04_01: row counts disagree: features 500, pts 600, frame_index 600, span 600, attribute rows 600 "
        "(truncated array?)",
        "P04_01: features: 1 chunk(s) do not match the checksum stored at commit (chunks 1); re-extract the video",
        "P04_01: features: 3 chunk checksums stored for 500 rows",
        "P04_01: 500 rows, but 60.00 s at 10 rows/s makes about 600",
        "P04_02: features: 1 of 3 chunks missing on disk",
        "P04_02: features: 1 chunk(s) do not match the checksum stored at commit (chunks 1); re-extract the video",
        "P04_02: features hold NaN/inf in 256 rows (first: row 256)",
        "P04_03: pts do not match the checksum stored at commit (silent corruption)",
        "P04_03: pts are not strictly increasing at row 10",
        "P04_03: span does not hold its row's pts (first frame <= pts <= last frame)",
        "P04_04: attributes missing: source_path, duration, width, height",
    ]


def test_verify_reports_a_damaged_chunk_and_checks_the_other_videos(store, tmp_path):
    """A truncated chunk (a RuntimeError deep in the codec) and a flipped bit that still decodes are both reported
    per video; the videos after them are still checked; the HDF5 export names the video instead of a traceback."""
    write_video(store, "P06_01", 600, seed=1)
    write_video(store, "P06_02", 600, seed=2)
    write_video(store, "P06_03", 600, seed=3)
    chunk = store.path / "videos" / "P06_01" / "features" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: no longer decodes
    group = zarr.open_group(store.path / "videos" / "P06_02", mode="r+")
    flipped = group["features"][5:6]
    flipped.view(np.uint16)[0, 9] ^= 1  # one bit of one value: still a valid float16, still decodes
    group["features"][5:6] = flipped  # written through zarr: only the checksum can tell
    problems = store.verify()
    assert len(problems) == 2, problems
    assert problems[0].startswith("P06_01: features chunk 1 (rows 256-511) cannot be read (RuntimeError: ")
    assert problems[1] == ("P06_02: features: 1 chunk(s) do not match the checksum stored at commit (chunks 0); "
                           "re-extract the video")
    with pytest.raises(StoreError, match=r"cannot export P06_01 .* rows 0-2047 cannot be read"):
        export_hdf5(store, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists() and not list(tmp_path.glob(".out.h5.*"))


def test_damaged_video_is_reported_and_can_be_redone(store):
    write_video(store, "P04_05", 30)
    (store.path / "videos" / "P04_05" / "zarr.json").write_text('{"attributes": {"compl')  # torn by hand
    assert store.complete_videos() == [] and not store.is_complete("P04_05")
    assert store.verify() == ["P04_05: in videos/ but not marked complete (damaged zarr.json?); re-extract it: "
                              "`epicfeat extract --video-ids P04_05`"]
    features, _, _ = write_video(store, "P04_05", 30, seed=3)  # the damaged folder is moved aside on commit
    np.testing.assert_array_equal(store.read("P04_05").features[:], features)
    assert store.verify() == []


# -------------------------------------------------------------------------------------------- failures
def test_failures_log_keeps_the_latest_and_drops_later_successes(store):
    store.record_failure("P05_01", "zero-byte file", path="/v/P05_01.MP4")
    store.record_failure("P05_02", "not a video")
    store.record_failure("P05_01", "truncated at t=3.2s", path="/v/P05_01.MP4")
    store.record_failure("P05_01", "truncated at t=3.2s", path="/v/P05_01.MP4")  # the same again: recorded once
    failures = store.failures()
    assert sorted(failures) == ["P05_01", "P05_02"]
    assert failures["P05_01"]["reason"] == "truncated at t=3.2s" and failures["P05_01"]["path"] == "/v/P05_01.MP4"
    assert failures["P05_02"]["path"] is None and failures["P05_02"]["time"]
    records = sorted((store.path / "failures").glob("*.json"))  # one file per record: nothing can interleave
    assert [json.loads(r.read_text())["reason"] for r in records if r.name.startswith("P05_01.")] == [
        "zero-byte file", "truncated at t=3.2s"]
    assert len(records) == 3
    assert [r["video_id"] for r in store.failure_records()] == ["P05_01", "P05_02", "P05_01"]
    write_video(store, "P05_02", 20)  # the retry succeeded
    assert sorted(store.failures()) == ["P05_01"]
    assert store.info()["videos_failed"] == 1


# ---------------------------------------------------------------------------------------------- export
def test_hdf5_export_round_trips_exactly(store, tmp_path):
    write_video(store, "P06_01", 600, seed=10)
    write_video(store, "P06_02", 37, seed=11, attrs={**SOURCE, "duration": 3.7, "extra": {"a": [1, 2]}})
    store.writer("P06_03", attrs=SOURCE).close()  # partial: not exported
    out = export_hdf5(store, tmp_path / "out" / "features.h5")
    assert out == tmp_path / "out" / "features.h5"
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.h5"]  # no temp file left
    with h5py.File(out, "r") as h5:
        assert json.loads(h5.attrs["featureset_json"]) == store.identity.to_dict()
        assert h5.attrs["key"] == store.path.name and h5.attrs["weights"] == "random-seed0"
        assert h5.attrs["fps"] == 10.0 and json.loads(h5.attrs["mean"]) == [0.485, 0.456, 0.406]
        assert sorted(h5["videos"]) == ["P06_01", "P06_02"]
        for video_id in ("P06_01", "P06_02"):
            video, group = store.read(video_id), h5["videos"][video_id]
            assert group["features"].dtype == np.float16 and group["features"].chunks == (256, 2048)
            np.testing.assert_array_equal(group["features"][:], video.features[:])
            np.testing.assert_array_equal(group["pts"][:], video.pts)
            np.testing.assert_array_equal(group["frame_index"][:], video.frame_indices)
            assert group["pts"].dtype == np.float64 and group["frame_index"].dtype == np.int64
            assert json.loads(group.attrs["attrs_json"]) == video.attrs
            assert group.attrs["source_fps"] == 59.94 and group.attrs["rows"] == video.rows
        assert json.loads(h5["videos"]["P06_02"].attrs["extra"]) == {"a": [1, 2]}


# ------------------------------------------------------------------------------------------------ info
def test_info_counts(store):
    write_video(store, "P07_01", 300, attrs={**SOURCE, "duration": 30.0})
    write_video(store, "P07_02", 37, attrs={**SOURCE, "duration": 3.7})
    with pytest.raises(KeyboardInterrupt):
        with store.writer("P07_03", attrs=SOURCE) as writer:
            writer.append(*make_rows(5, 0))
            raise KeyboardInterrupt
    store.record_failure("P07_04", "missing")
    facts = store.info()
    assert (facts["videos_complete"], facts["videos_partial"], facts["videos_failed"]) == (2, 1, 1)
    assert facts["rows"] == 337
    assert facts["hours"] == pytest.approx(33.7 / 3600)
    assert facts["bytes"] == sum(p.stat().st_size for p in store.path.rglob("*") if p.is_file())
    assert facts["key"] == store.path.name and facts["identity"] == identity().to_dict()


# -------------------------------------------------------------------------------------------- claims
def test_commit_refuses_when_the_claim_was_taken_over(store):
    features, pts, frames = make_rows(300, seed=1)
    slow = store.claim("P07_02", lease_s=30)
    writer = store.writer("P07_02", attrs={**SOURCE, "duration": 30.0}, claim=slow)
    writer.append(features, pts, frames)
    slow.path.unlink()  # broken as stale by another writer (this one was paused, or cut off from NFS)...
    fresh = store.claim("P07_02", lease_s=30)  # ...which took the video over
    with store.writer("P07_02", attrs={**SOURCE, "duration": 30.0}, claim=fresh) as redo:  # removes slow's folder
        assert not writer.folder.exists()
        redo.append(features, pts, frames)
        redo.commit()
    fresh.release()
    with pytest.raises(ClaimLostError, match="claim expired or was taken over"):
        writer.commit()  # zarr would recreate the folder and publish it with missing chunks; the claim says no
    np.testing.assert_array_equal(store.read("P07_02").features[:], features)
    assert store.verify() == [] and store.partial_videos() == []
    with pytest.raises(ClaimLostError, match="no longer held"):
        store.writer("P07_02", attrs=SOURCE, claim=slow, overwrite=True)
