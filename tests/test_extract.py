"""Stage one end to end on tiny generated videos: rows, features, resume after SIGKILL, bad input, many writers,
dask."""
import errno
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import epicfeat.extract
import epicfeat.frames
from epicfeat.backbone import create_backbone, fold_batch_norms
from epicfeat.devices import native_bf16_cpu, resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.extract import (
    ExtractConfig,
    _dask_client,
    extract_features,
    feature_set_identity,
    preprocess_of,
    resolve_fold_bn,
    resolved,
)
from epicfeat.frames import DecodePool, FramesDecoded, iter_frames
from epicfeat.recipes import save_config
from epicfeat.store import FeatureStore, VideoWriter

SIZE = (96, 54)  # 16:9, tiny
# Child processes (the CLI, concurrent extracts) compute with one thread too: on a shared 2-core machine two
# OpenMP threads made a tiny ResNet50 batch 20x slower (2.5 s vs 0.12 s measured).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A feature set's folder while a run writes into it. Not "*": that also matches the hidden folder a new set is built
# in, which is renamed into place while a polling glob may be listing it (FileNotFoundError inside pathlib).
PUBLISHED_SET = "[!.]*"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_for_the_module():
    """Tiny batches gain nothing from intra-op threads (see conftest's one_torch_thread); module-wide, so the
    module-scoped reference run is covered too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_video(path: Path, *, fps: Fraction, seconds: float, seed: int = 0) -> None:
    """A small H.264 file whose frames differ (a moving bright square on noise), so features differ per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for i in range(round(seconds * fps)):
            image = rng.integers(0, 60, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
            x = (i * 3) % (SIZE[0] - 20)
            image[15:35, x : x + 20] = (250, 40 + seed * 50 % 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "P01" / "P01_01.MP4", fps=Fraction(60000, 1001), seconds=2.0, seed=1)
    write_video(root / "P01" / "P01_02.MP4", fps=Fraction(50), seconds=1.6, seed=2)
    write_video(root / "P02" / "videos" / "P02_01.mp4", fps=Fraction(30), seconds=2.4, seed=3)
    return root


VIDEO_IDS = ("P01_01", "P01_02", "P02_01")


def config(videos: Path, cache: Path, **overrides) -> ExtractConfig:
    base = dict(
        video_ids=VIDEO_IDS, videos=videos, cache=cache, weights="random", seed=0, fps=10.0, resize=64, crop=56,
        precision="bf16", batch_size=8, decode_workers=0, device="cpu", progress=False,
    )
    base.update(overrides)
    return ExtractConfig(**base)


def read_all(store_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    store = FeatureStore.open(store_path)
    out = {}
    for video_id in store.complete_videos():
        video = store.read(video_id)
        out[video_id] = (np.asarray(video.features[:]), video.pts, video.frame_indices)
    return out


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    """One uninterrupted run that the other tests compare against."""
    summary = extract_features(config(videos, tmp_path_factory.mktemp("cache-ref")))
    assert summary.ok
    return summary, read_all(summary.store)


def test_rows_match_the_decoded_stream_and_a_direct_model_call(videos, reference):
    summary, rows = reference
    assert sorted(rows) == sorted(VIDEO_IDS)
    attrs = FeatureStore.open(summary.store).video_attrs("P01_01")
    assert attrs["preprocess"] == preprocess_of(config(videos, Path("unused"))).identity()
    assert attrs["preprocess"]["interpolation"] == "swscale_bilinear" and attrs["decoder"].startswith("pyav-")
    assert [r.video_id for r in summary.done] and summary.rows == sum(len(v[1]) for v in rows.values())
    cfg = resolved(config(videos, Path("unused")), torch.device("cpu"))  # the backbone's mean and std filled in
    assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # resnet50's: ImageNet's
    backbone = fold_batch_norms(create_backbone("random", seed=0).eval())  # as extract runs it (fold_bn)
    for video_id, path in [("P01_01", videos / "P01/P01_01.MP4"), ("P02_01", videos / "P02/videos/P02_01.mp4")]:
        batches = list(iter_frames(path, fps=10.0, preprocess=preprocess_of(cfg), batch_size=1000))
        pts = np.concatenate([b.pts for b in batches])
        images = np.concatenate([b.images for b in batches])
        features, stored_pts, frame_indices = rows[video_id]
        np.testing.assert_array_equal(stored_pts, pts)  # timestamps come from the stream, row for row
        assert features.shape == (len(pts), 2048) and features.dtype == np.float16
        # 10 rows/s: one row per 100 ms of video, the first frame at or after each 0.1 s step
        assert len(pts) == {"P01_01": 20, "P02_01": 24}[video_id]
        fps = {"P01_01": 60000 / 1001, "P02_01": 30.0}[video_id]
        np.testing.assert_allclose(pts, frame_indices / fps, atol=1e-6)
        # the cached row equals the backbone applied to that decoded frame (same padded batch shape), normalised
        # with the feature set's mean and std: (x - 255 mean) / (255 std)
        pixels = torch.zeros((cfg.batch_size, 3, *images.shape[1:3]))  # (B, 3, H, W)
        pixels[:3] = torch.from_numpy(images[:3]).permute(0, 3, 1, 2).float()
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
        pixels = (pixels - mean) * (1.0 / (torch.tensor(cfg.std).view(1, 3, 1, 1) * 255))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            direct = backbone(pixels.contiguous(memory_format=torch.channels_last))
        np.testing.assert_array_equal(features[:3], direct[:3].float().numpy().astype(np.float16))


def test_rerun_skips_complete_videos(videos, reference, tmp_path):
    summary, _ = reference
    again = extract_features(config(videos, summary.store.parent))
    assert again.ok and not again.done and sorted(again.skipped) == sorted(VIDEO_IDS)


def test_resume_after_sigkill_is_bit_identical(videos, reference, tmp_path):
    """Kill the CLI with SIGKILL once the first video is complete, re-run it, and compare every byte."""
    _, expected = reference
    cache = tmp_path / "cache"
    cfg_file = tmp_path / "extract.yaml"
    # the first video is long enough that the kill lands while a later one is half-written
    save_config(config(videos, cache), cfg_file)
    command = [sys.executable, "-m", "epicfeat", "extract", "--config", str(cfg_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CHILD_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(cache.glob(f"{PUBLISHED_SET}/videos/*/zarr.json")):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_store = next(cache.glob("*/featureset.json")).parent
    assert len(FeatureStore.open(killed_store).complete_videos()) < len(VIDEO_IDS), "the kill came too late"
    resumed = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV)
    assert resumed.returncode == 0, resumed.stderr
    _assert_equal_to_reference(killed_store, expected)
    assert FeatureStore.open(killed_store).partial_videos() == []


def test_bad_inputs_are_recorded_and_the_rest_finishes(videos, tmp_path):
    root = tmp_path / "videos"
    for video_id in VIDEO_IDS[:1]:
        write_video(root / "P01" / f"{video_id}.MP4", fps=Fraction(50), seconds=1.0)
    (root / "P03").mkdir(parents=True)
    (root / "P03" / "P03_01.MP4").write_bytes(b"")  # zero bytes
    (root / "P03" / "P03_02.MP4").write_text("this is not a video\n")  # not a video
    good = (root / "P01" / "P01_01.MP4").read_bytes()
    (root / "P03" / "P03_03.MP4").write_bytes(good[: len(good) // 2])  # truncated
    ids = ("P01_01", "P03_01", "P03_02", "P03_03", "P09_99")  # P09_99 does not exist
    summary = extract_features(config(root, tmp_path / "cache", video_ids=ids))
    assert not summary.ok
    assert [r.video_id for r in summary.done] == ["P01_01"]
    assert summary.missing == ("P09_99",)
    assert sorted(r.video_id for r in summary.failed) == ["P03_01", "P03_02", "P03_03"]
    store = FeatureStore.open(summary.store)
    failures = store.failures()
    assert sorted(failures) == ["P03_01", "P03_02", "P03_03", "P09_99"]
    assert all(f["reason"] for f in failures.values())
    assert store.complete_videos() == ["P01_01"] and store.partial_videos() == []


def test_cli_exits_nonzero_with_summary_on_failures(videos, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "epicfeat", "extract", "--videos", str(videos), "--video-ids",
         "P01_02,P07_07", "--cache", str(tmp_path / "c"), "--weights", "random", "--resize", "64", "--crop", "56",
         "--decode-workers", "0", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, env=CHILD_ENV,
    )
    assert result.returncode == 1, result.stderr
    assert "P07_07" in result.stdout and "not found" in result.stdout
    assert _table_value(result.stdout, "videos extracted") == "1" and _table_value(result.stdout, "complete") == "1 / 2"


def test_two_dask_workers_equal_one_process(videos, reference, tmp_path):
    """Two LocalCluster workers, each with a decode process; a broken file among the videos is recorded once
    (the worker records it with its path; the client used to record it a second time)."""
    _, expected = reference
    root = _linked_videos(videos, tmp_path / "videos")
    summary = extract_features(config(root, tmp_path / "cache", scheduler="local", workers=2, decode_workers=1,
                                      video_ids=VIDEO_IDS + ("P03_01",)))
    assert not summary.ok and len(summary.done) == len(VIDEO_IDS)
    assert [r.video_id for r in summary.failed] == ["P03_01"]
    records = FeatureStore.open(summary.store).failure_records()
    assert [(r["video_id"], r["path"]) for r in records] == [("P03_01", str(root / "P03" / "P03_01.MP4"))]
    _assert_equal_to_reference(summary.store, expected)


# ------------------------------------------------------------------------------- commit when done
def test_each_video_is_committed_as_soon_as_its_last_row_is_written(tmp_path, monkeypatch):
    """Videos whose row counts are no multiple of the batch size: a video's last batch runs padded and the video is
    committed at once, so while video j is written every video before it is complete and one writer is open."""
    root = tmp_path / "videos"
    ids = [f"P05_{i:02d}" for i in range(1, 7)]
    seconds = (0.9, 0.8, 1.2, 0.8, 1.2, 1.6)  # rows 9, 8, 12, 8, 12, 16: the running total is never a multiple of 4
    for i, video_id in enumerate(ids):
        write_video(root / "P05" / f"{video_id}.MP4", fps=Fraction(30), seconds=seconds[i], seed=i)
    seen: list[tuple[str, bool, int]] = []
    append = VideoWriter.append

    def watched_append(self, features, pts, frame_indices, span=None):
        earlier = ids[: ids.index(self.video_id)]
        seen.append((self.video_id, all(self.store.is_complete(v) for v in earlier), len(self.store.partial_videos())))
        append(self, features, pts, frame_indices, span)

    monkeypatch.setattr(VideoWriter, "append", watched_append)
    summary = extract_features(config(root, tmp_path / "cache", video_ids=tuple(ids), batch_size=4))
    assert [r.video_id for r in summary.done] == ids and summary.ok
    assert [r.rows for r in summary.done] == [9, 8, 12, 8, 12, 16]
    assert {video_id for video_id, _, _ in seen} == set(ids)
    assert all(earlier_complete and open_writers == 1 for _, earlier_complete, open_writers in seen)


# ----------------------------------------------------------------------------- finding 2: failures never fatal
def test_unreadable_file_is_recorded_once_with_its_path(videos, tmp_path, monkeypatch):
    """PermissionError (what an unreadable file raises; faked here because tests may run as root) becomes a
    failure record with the path; the other videos complete."""
    real_probe = epicfeat.frames.probe_video

    def probe(path):
        if Path(path).name == "P01_02.MP4":
            raise PermissionError(13, "Permission denied", str(path))
        return real_probe(path)

    monkeypatch.setattr(epicfeat.frames, "probe_video", probe)
    summary = extract_features(config(videos, tmp_path / "cache"))
    assert not summary.ok and sorted(r.video_id for r in summary.done) == ["P01_01", "P02_01"]
    (failed,) = summary.failed
    assert failed.video_id == "P01_02" and "Permission denied" in failed.reason
    records = FeatureStore.open(summary.store).failure_records()
    assert [(r["video_id"], r["path"]) for r in records] == [("P01_02", str(videos / "P01" / "P01_02.MP4"))]


def test_quota_exceeded_is_a_clear_error(videos, tmp_path, monkeypatch):
    def no_quota(self, *args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(VideoWriter, "append", no_quota)
    with pytest.raises(EpicfeatError, match="disk quota .* exhausted"):
        extract_features(config(videos, tmp_path / "cache", video_ids=("P01_01",)))


@pytest.mark.parametrize("times", [1, 2])
def test_a_dead_decoder_costs_one_retry_of_its_video(videos, reference, tmp_path, monkeypatch, times):
    """SIGKILL the decode process at P01_01's first batch (``times`` times): once, the video starts over on a fresh
    process and is stored bit for bit as without the kill; twice, it is recorded as failed; the others complete."""
    _, expected = reference
    decode, kills = DecodePool.decode, []

    def killing_decode(pool, jobs):
        for event in decode(pool, jobs):
            if isinstance(event, FramesDecoded) and event.video_id == "P01_01" and len(kills) < times:
                # Batches a killed process sent before it died still arrive, while its successor may not exist
                # yet: kill only a live decode process not killed before.
                alive = [p for p in multiprocessing.active_children()
                         if p.name == "epicfeat-decode" and p.pid not in kills]
                if alive:
                    kills.append(alive[0].pid)
                    os.kill(alive[0].pid, signal.SIGKILL)
            yield event

    monkeypatch.setattr(DecodePool, "decode", killing_decode)
    # Twice: P01_01 in 10 batches of 2 rows, so that a decoder is still on it at its first batches (a decoder runs
    # at most PREFETCH_BATCHES ahead); in 3 batches of 8 the second decoder could finish it and be killed on P01_02.
    batch_size = 8 if times == 1 else 2
    summary = extract_features(config(videos, tmp_path / "cache", decode_workers=1, batch_size=batch_size))
    store = FeatureStore.open(summary.store)
    assert len(kills) == times
    if times == 1:  # the retry on a fresh process completes it, bit for bit
        assert summary.ok
        _assert_equal_to_reference(summary.store, expected)
    else:
        assert [r.video_id for r in summary.done] == ["P01_02", "P02_01"]
        (failed,) = summary.failed
        assert failed.video_id == "P01_01" and "decode process died (signal 9)" in failed.reason
        assert [r["video_id"] for r in store.failure_records()] == ["P01_01"]
    assert store.partial_videos() == []


# ------------------------------------------------------------------------ findings 3 and 4: many writers
_EXTRACT_CHILD = """
import json, sys
from epicfeat.recipes import from_dict, read_yaml
from epicfeat.configs import ExtractConfig
from epicfeat.extract import extract_features
summary = extract_features(from_dict(ExtractConfig, read_yaml(sys.argv[1])))
print(json.dumps({"done": [r.video_id for r in summary.done], "by_others": list(summary.by_others),
                  "skipped": list(summary.skipped), "failed": [r.video_id for r in summary.failed]}))
"""


def _table_value(output: str, name: str) -> str:
    """The value beside ``name`` in extract's summary table."""
    match = re.search(rf"│\s*{re.escape(name)}\s*│\s*(.*?)\s*│", output)
    assert match, f"no '{name}' row in:\n{output}"
    return match.group(1)


def _start_extract(cfg: ExtractConfig, tmp_path: Path, name: str) -> subprocess.Popen:
    cfg_file = tmp_path / f"{name}.yaml"
    save_config(cfg, cfg_file)
    return subprocess.Popen([sys.executable, "-c", _EXTRACT_CHILD, str(cfg_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)


def _finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _assert_equal_to_reference(store_path: Path, expected) -> None:
    got = read_all(store_path)
    assert sorted(got) == sorted(expected)
    for video_id, (features, pts, frames) in expected.items():
        np.testing.assert_array_equal(got[video_id][0], features)
        np.testing.assert_array_equal(got[video_id][1], pts)
        np.testing.assert_array_equal(got[video_id][2], frames)


def _linked_videos(videos: Path, root: Path) -> Path:
    """The module's videos linked under ``root``, plus P03_01.MP4, which is not a video."""
    for path in ("P01/P01_01.MP4", "P01/P01_02.MP4", "P02/videos/P02_01.mp4"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(videos / path)
    (root / "P03").mkdir()
    (root / "P03" / "P03_01.MP4").write_text("not a video")
    return root


def test_three_processes_on_one_cache_divide_the_videos(videos, reference, tmp_path):
    """Three `epicfeat extract` started together on one cache: every video is extracted by exactly one of them and
    the broken one is recorded once. Each prints its own share (videos, rows, rate) and the same state of the set:
    3 of 4 complete, 1 failed, whoever did them; each exits 1 (the broken video)."""
    _, expected = reference
    root = _linked_videos(videos, tmp_path / "videos")
    cfg = config(root, tmp_path / "cache", video_ids=("P03_01", *VIDEO_IDS))
    save_config(cfg, tmp_path / "extract.yaml")
    command = [sys.executable, "-m", "epicfeat", "extract", "--config", str(tmp_path / "extract.yaml")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**CHILD_ENV, "COLUMNS": "150"}) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [1, 1, 1], [err[-2000:] for _, err in outputs]
    tables = [out for out, _ in outputs]
    extracted = [int(_table_value(t, "videos extracted")) for t in tables]
    rows = [int(_table_value(t, "rows written").replace(",", "")) for t in tables]
    assert sum(extracted) == 3 and sum(rows) == sum(len(v[1]) for v in expected.values())  # each its own share
    for table, own in zip(tables, rows):
        rate, seconds = map(float, re.fullmatch(r"([\d.]+) rows/s over ([\d.]+) s", _table_value(table, "throughput"))
                            .groups())
        assert rate == pytest.approx(own / seconds, rel=0.05, abs=0.1)  # this process's rows over its own time
        assert _table_value(table, "complete") == "3 / 4" and _table_value(table, "failed (by any writer)") == "1"
        assert "P03_01" in table
    store_path = next((tmp_path / "cache").glob("*/featureset.json")).parent
    _assert_equal_to_reference(store_path, expected)
    store = FeatureStore.open(store_path)
    assert [r["video_id"] for r in store.failure_records()] == ["P03_01"]
    assert store.partial_videos() == [] and list((store_path / ".claims").iterdir()) == []


def test_a_killed_writers_video_is_taken_over_after_its_lease(videos, reference, tmp_path):
    """A is SIGKILLed mid-video; B, started at once on the same cache, finds A's claim stale (A's pid is gone on
    this host; on another host after the lease, see test_store's claim tests), redoes that video (removing A's
    partial folder) and exits 0 with every video complete."""
    _, expected = reference
    cache = tmp_path / "cache"
    cfg = config(videos, cache, claim_lease_s=2.0, video_ids=("P02_01", "P01_01", "P01_02"))
    first = _start_extract(cfg, tmp_path, "a")
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob(f"{PUBLISHED_SET}/.partial/*/features/c/*/*")):
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    store_path = next(cache.glob("*/featureset.json")).parent
    store = FeatureStore.open(store_path)
    held = sorted(p.name.split(".")[0] for p in (store_path / ".claims").glob("*.claim"))
    assert held and store.partial_videos(), "the kill came too late"
    killed_partials = {p for p in (store_path / ".partial").iterdir() if p.is_dir()}
    second = _start_extract(cfg, tmp_path, "b")
    report = _finish(second)
    assert sorted(report["done"] + report["skipped"]) == sorted(VIDEO_IDS)
    assert set(held) <= set(report["done"])  # the killed writer's videos were redone by B
    _assert_equal_to_reference(store_path, expected)
    assert store.partial_videos() == [] and not any(p.exists() for p in killed_partials)


# -------------------------------------------------------------------------------------- finding 5: identity
def test_identity_keys_what_changes_the_numbers_and_nothing_else(videos, tmp_path):
    backbone = create_backbone("random", seed=0)
    cpu = resolve_device("cpu")
    base = feature_set_identity(config(videos, tmp_path), backbone, cpu)
    assert base.decoder == f"pyav-{av.__version__}-libavcodec-{'.'.join(map(str, av.library_versions['libavcodec']))}"
    assert base.device == f"cpu-{torch.backends.cpu.get_cpu_capability()}" and base.tf32 is False
    assert (base.batch_size, base.channels_last, base.compile, base.precision, base.fold_bn) == (8, True, False, "bf16",
                                                                                                True)
    keys = {base.key()}
    changes = ({"batch_size": 5}, {"channels_last": False}, {"compile": True}, {"precision": "fp32"}, {"fold_bn": False})
    for change in changes:
        keys.add(feature_set_identity(config(videos, tmp_path, **change), backbone, cpu).key())
    assert len(keys) == 1 + len(changes)
    for same in ({"decode_workers": 2}, {"decode_threads": 1}, {"scheduler": "local"}, {"claim_lease_s": 5.0}):
        assert feature_set_identity(config(videos, tmp_path, **same), backbone, cpu) == base


def test_fold_bn_auto_folds_on_a_cpu_and_not_on_a_gpu(videos, tmp_path):
    """Folded batch norms ran ResNet50 1.3x faster on CPUs and 0.86x as fast on an H200 (bf16, channels_last)."""
    assert resolve_fold_bn(None, torch.device("cpu")) is True and resolve_fold_bn(None, torch.device("cuda")) is False
    assert resolve_fold_bn(False, torch.device("cpu")) is False and resolve_fold_bn(True, torch.device("cuda")) is True
    summary = extract_features(config(videos, tmp_path / "cache", video_ids=("P01_02",)))  # fold_bn: auto
    assert FeatureStore.open(summary.store).identity.fold_bn is True  # recorded resolved, never "auto"
    saved = (summary.store / "extract_config.yaml").read_text()
    assert "fold_bn: true" in saved and "precision: bf16" in saved


def test_other_batch_size_is_another_set_and_decode_workers_change_nothing(videos, reference, tmp_path):
    """A resume with another batch size cannot mix numbers: it goes to its own feature set (on this CPU its
    numbers happen to be bit-identical, but cuDNN picks kernels per batch shape). Decode workers are not part of
    the identity: 0 or 1 decode processes give the same set, bit for bit."""
    summary, expected = reference
    cache = tmp_path / "cache"
    first = extract_features(config(videos, cache, video_ids=("P01_01",)))
    resumed = extract_features(config(videos, cache, batch_size=5))
    assert first.store != resumed.store and resumed.skipped == () and len(resumed.done) == 3
    assert FeatureStore.open(first.store).complete_videos() == ["P01_01"]
    _assert_equal_to_reference(resumed.store, expected)  # no ulp flipped by the batch size on this CPU
    with_workers = extract_features(config(videos, tmp_path / "cache2", decode_workers=1))
    assert with_workers.store.name == summary.store.name
    _assert_equal_to_reference(with_workers.store, expected)


# ------------------------------------------------------------------------------ finding 9: precision=auto
def test_native_bf16_is_read_from_cpu_flags(tmp_path, monkeypatch):
    from epicfeat import devices

    flags = {"amx": "fpu sse2 avx512f amx_bf16 amx_tile", "avx512": "fpu avx512f avx512_bf16", "none": "fpu avx2"}
    for name, line in flags.items():
        (tmp_path / name).write_text(f"processor\t: 0\nflags\t\t: {line}\n")
    assert devices.native_bf16_cpu(str(tmp_path / "amx")) and devices.native_bf16_cpu(str(tmp_path / "avx512"))
    assert not devices.native_bf16_cpu(str(tmp_path / "none")) and not devices.native_bf16_cpu(str(tmp_path / "x"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16" and devices.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32" and devices.resolve_precision("bf16", cpu) == "bf16"


@pytest.fixture
def cuda_flags_set_otherwise():
    """TF32 on and cuDNN autotuning off (not what extract runs with), put back as they were after the test."""
    backends = torch.backends
    previous = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark)
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = True, True, False
    yield lambda: (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark)
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = previous


def test_tf32_is_off_in_the_model_calls_only(videos, tmp_path, monkeypatch, cuda_flags_set_otherwise):
    """The feature set records tf32: False, and the model runs so; the flags are process-wide, so extract puts them
    back: a later model of the same process (the demo's fp32 LSTM) computes as in a fresh process."""
    flags = cuda_flags_set_otherwise
    seen = []
    build = epicfeat.extract.build_encoder

    def build_and_record(*args, **kwargs):
        encoder = build(*args, **kwargs)
        encoder.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(flags()))
        return encoder

    monkeypatch.setattr(epicfeat.extract, "build_encoder", build_and_record)
    summary = extract_features(config(videos, tmp_path / "cache", video_ids=("P01_02",)))
    assert summary.ok and FeatureStore.open(summary.store).identity.tf32 is False
    assert seen and set(seen) == {(False, False, True)}  # each batch: TF32 off, cuDNN autotuning on
    assert flags() == (True, True, False)  # as they were before


def test_auto_precision_is_resolved_into_the_identity(videos, tmp_path):
    summary = extract_features(config(videos, tmp_path / "cache", precision="auto", video_ids=("P01_02",)))
    identity = FeatureStore.open(summary.store).identity
    assert identity.precision == ("bf16" if native_bf16_cpu() else "fp32")


def test_scheduler_slurm_submits_one_gpu_job_per_worker(monkeypatch):
    """--scheduler slurm: dask-jobqueue jobs of one GPU, one dask thread, CPUs for the decode processes and a
    non-daemonic worker (so it may start them). Nothing is submitted here: scale() is replaced."""
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    scaled = []
    monkeypatch.setattr(dask_jobqueue.SLURMCluster, "scale", lambda self, jobs=0: scaled.append(jobs))
    client, cluster = _dask_client(ExtractConfig(scheduler="slurm", decode_workers=7, workers=4))
    try:
        script = cluster.job_script()
    finally:
        client.close()
        cluster.close()
    assert scaled[0] == 4  # (close() scales to 0)
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=8" in script
    assert "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script and "--nthreads 1" in script
