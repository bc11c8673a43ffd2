"""Packing segments to stored rows by pts, the clamping rules, TSN sampling, gather and feature statistics."""
import dataclasses
import tempfile
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from epicfeat.store import FeatureSetIdentity, FeatureStore
from epicfeat.temporal.data import (
    Context,
    PackedSplit,
    PackError,
    cached_pack_split,
    feature_stats,
    pack_split,
    sequence_offsets,
)


# --- a tiny in-memory stand-in for FeatureStore (same duck type: complete_videos, read, identity) -------------


class _MemoryStore:
    """Videos as numpy arrays; ``incomplete`` ones exist but are not complete (like a crashed extract)."""

    def __init__(self, videos: dict[str, tuple[np.ndarray, np.ndarray]], incomplete=()):
        self.videos = videos
        self.incomplete = set(incomplete)
        self.identity = SimpleNamespace(feature_dim=next(iter(videos.values()))[0].shape[1],
                                        to_dict=lambda: {"weights": "random-seed0", "fps": 10.0})
        self.reads: list[str] = []

    def complete_videos(self) -> list[str]:
        return sorted(v for v in self.videos if v not in self.incomplete)

    def read(self, video_id):
        self.reads.append(video_id)
        features, pts = self.videos[video_id]
        return SimpleNamespace(video_id=video_id, features=features, pts=pts,
                               frame_indices=np.arange(len(pts)), attrs={})


def _video(pts, dim=4, video_number=0):
    """Features whose column 0 is the row index and column 1 the video number, so packed rows are recognisable."""
    features = np.zeros((len(pts), dim), dtype=np.float16)
    features[:, 0] = np.arange(len(pts))
    features[:, 1] = video_number
    return features, np.asarray(pts, dtype=np.float64)


def _segments(rows):
    """rows: (narration_id, video_id, start_sec, stop_sec[, verb, noun])."""
    frame = pd.DataFrame([r[:4] for r in rows], columns=["narration_id", "video_id", "start_sec", "stop_sec"])
    frame["participant_id"] = frame["video_id"].str[:3]
    if len(rows[0]) > 4:
        frame["verb_class"] = [r[4] for r in rows]
        frame["noun_class"] = [r[5] for r in rows]
    return frame


def _segment_rows(split: PackedSplit, s: int) -> list[int]:
    """The original (in-video) row indices segment s owns, read back from the packed features."""
    begin, count = int(split.row_start[s]), int(split.row_count[s])
    return split.features[begin:begin + count, 0].long().tolist()


def _rows_at_10_per_second_from(fps: Fraction, n_rows: int) -> np.ndarray:
    """pts of rows sampled at 10/s from a video at ``fps``: each takes the first frame at or after k/10 s."""
    pts = []
    for k in range(n_rows):
        frame = -(-Fraction(k, 10) * fps // 1)  # ceil(k/10 * fps)
        pts.append(float(frame / fps))
    return np.array(pts)


# --- joining segments to rows -----------------------------------------------------------------------------------


def test_join_by_pts_on_a_regular_grid_uses_start_inclusive_stop_exclusive():
    pts = np.arange(20) * 0.1  # 3 * 0.1 = 0.30000000000000004: float rounding must not move a boundary
    store = _MemoryStore({"P01_01": _video(pts)})
    split = pack_split(store, _segments([("a", "P01_01", 0.3, 0.6, 1, 2), ("b", "P01_01", 1.0, 1.25, 3, 4)]),
                       progress=False)
    assert _segment_rows(split, 0) == [3, 4, 5]  # row at 0.6 is the stop: excluded
    assert _segment_rows(split, 1) == [10, 11, 12]
    assert split.verb_labels.tolist() == [1, 3] and split.noun_labels.tolist() == [2, 4]
    assert split.narration_ids == ["a", "b"] and split.video_ids == ["P01_01"] * 2
    assert split.participant_ids == ["P01", "P01"]
    assert split.feature_set == {"weights": "random-seed0", "fps": 10.0}


def test_join_by_pts_on_a_59_94_fps_grid():
    pts = _rows_at_10_per_second_from(Fraction(60000, 1001), 40)
    # Hand-checked: row 10 takes frame ceil(59.94) = 60 at 1.001 s, row 14 frame 84 at 1.4014 s,
    # row 15 frame 90 at 1.5015 s, row 20 frame 120 at 2.002 s, row 25 frame 150 at 2.5025 s.
    assert pts[10] == pytest.approx(1.001) and pts[15] == pytest.approx(1.5015)
    store = _MemoryStore({"P01_01": _video(pts)})
    segments = _segments([
        ("a", "P01_01", 1.00, 1.50),  # EPIC-style 10 ms timestamps: rows 10..14
        ("b", "P01_01", 2.002, 2.5025),  # start and stop exactly on rows 20 and 25: [20, 25)
        ("c", "P01_01", 0.95, 1.001),  # stop exactly on row 10's pts, row 9 (0.9009) before start: no row inside
    ])
    split = pack_split(store, segments, progress=False)
    assert _segment_rows(split, 0) == [10, 11, 12, 13, 14]
    assert _segment_rows(split, 1) == [20, 21, 22, 23, 24]
    assert _segment_rows(split, 2) == [10]  # nearest to the midpoint 0.9755 is row 10 (1.001)
    assert split.verb_labels is None and split.noun_labels is None
    assert split.summary["empty_clamped"] == 1


def test_clamping_and_missing_videos_are_counted_not_raised():
    store = _MemoryStore(
        {"P01_01": _video(np.arange(10) * 0.1), "P01_02": _video(np.arange(5) * 0.1, video_number=2)},
        incomplete={"P01_02"},
    )
    segments = _segments([
        ("zero", "P01_01", 0.42, 0.42),  # zero length: nearest row 4
        ("between", "P01_01", 0.41, 0.44),  # between rows 4 and 5, midpoint 0.425: row 4
        ("between2", "P01_01", 0.46, 0.49),  # midpoint 0.475: row 5
        ("gone", "P99_01", 1.0, 2.0),  # video not in the store: dropped
        ("partly_past", "P01_01", 0.75, 1.6),  # rows 8, 9 exist, the rest does not
        ("fully_past", "P01_01", 2.0, 3.0),  # no row anywhere near: the last row
        ("to_the_end", "P01_01", 0.8, 1.0),  # ends where the last row's interval ends: not clamped
        ("crashed", "P01_02", 0.0, 0.3),  # incomplete video: dropped like a missing one
    ])
    split = pack_split(store, segments, progress=False)
    assert split.narration_ids == ["zero", "between", "between2", "partly_past", "fully_past", "to_the_end"]
    assert [_segment_rows(split, s) for s in range(len(split))] == [[4], [4], [5], [8, 9], [9], [8, 9]]
    assert split.summary["empty_clamped"] == 3
    assert split.summary["past_end_clamped"] == 2
    assert split.summary["missing_video_dropped"] == 2
    assert split.summary["missing_videos"] == 2
    assert split.missing_video_ids == ("P01_02", "P99_01")
    assert split.summary["segments"] == 6 and len(split) == 6
    assert split.row_count.min() >= 1
    assert store.reads == ["P01_01"]  # each present video read once, incomplete ones never


def test_overlapping_segments_share_rows_and_only_needed_rows_are_packed():
    store = _MemoryStore({
        "P01_01": _video(np.arange(30) * 0.1, video_number=1),
        "P02_01": _video(np.arange(30) * 0.1, video_number=2),
    })
    segments = _segments([
        ("b1", "P02_01", 2.0, 2.3),  # rows 20..22 of the second video
        ("a1", "P01_01", 0.0, 0.5),  # rows 0..4
        ("a2", "P01_01", 0.3, 0.8),  # rows 3..7: 3 and 4 shared with a1
        ("a3", "P01_01", 1.5, 1.7),  # rows 15, 16 (rows 8..14 needed by nobody)
    ])
    split = pack_split(store, segments, progress=True)  # the rich bar goes to stderr
    packed = split.features[:, :2].long().tolist()  # (video number, row) of each packed row, videos sorted
    assert packed == [[r, 1] for r in (0, 1, 2, 3, 4, 5, 6, 7, 15, 16)] + [[r, 2] for r in (20, 21, 22)]
    assert split.row_start.tolist() == [10, 0, 3, 8]
    assert split.row_count.tolist() == [3, 5, 5, 2]
    assert split.summary["rows"] == 13 and split.summary["segment_rows"] == 15 and split.summary["videos"] == 2
    assert split.features.dtype == torch.float16 and split.features.is_contiguous()


def test_pack_into_a_memmap_when_over_the_memory_budget(tmp_path, monkeypatch):
    import epicfeat.temporal.data as data_module

    rng = np.random.default_rng(0)
    videos = {f"P01_0{v}": (rng.normal(size=(50, 16)).astype(np.float16), np.arange(50) * 0.1) for v in (1, 2)}
    segments = _segments([("a", "P01_01", 0.0, 1.2), ("b", "P01_02", 2.0, 4.0), ("c", "P01_01", 3.05, 3.3)])
    in_memory = pack_split(_MemoryStore(videos), segments, progress=False)
    monkeypatch.setattr(data_module, "_memory_budget", lambda: 0)  # every pack is over the budget
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mapped = pack_split(_MemoryStore(videos), segments, progress=False)
    assert in_memory.summary["memmapped"] == 0 and mapped.summary["memmapped"] == 1
    assert mapped.summary["packed_bytes"] == in_memory.summary["packed_bytes"] == (12 + 20 + 2) * 16 * 2  # rows 0..11, 31..32; 20..39
    assert torch.equal(mapped.features, in_memory.features)
    assert torch.equal(mapped.row_start, in_memory.row_start) and torch.equal(mapped.row_count, in_memory.row_count)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(mapped.gather(torch.tensor([0, 1, 2]), 8, train=True, generator=gen),
                       in_memory.gather(torch.tensor([0, 1, 2]), 8, train=True, generator=gen.manual_seed(0)))


def test_a_split_whose_videos_are_all_missing_packs_to_nothing():
    store = _MemoryStore({"P01_01": _video(np.arange(10) * 0.1)})
    split = pack_split(store, _segments([("a", "P02_01", 0.0, 1.0, 1, 2)]), progress=False)
    assert len(split) == 0 and split.features.shape == (0, 4) and split.verb_labels.tolist() == []
    assert split.summary["missing_video_dropped"] == 1 and split.missing_video_ids == ("P02_01",)
    with pytest.raises(PackError, match="empty split"):
        feature_stats(split)


def test_bad_input_is_a_clear_error():
    store = _MemoryStore({"P01_01": _video([0.0, 0.2, 0.1])})
    with pytest.raises(PackError, match=r"P01_01 .*backwards at row 2.*epicfeat extract --video-ids P01_01"):
        pack_split(store, _segments([("a", "P01_01", 0.0, 0.5)]), progress=False)
    with pytest.raises(PackError, match=r"lacks columns \['start_sec', 'stop_sec'\]"):
        pack_split(store, pd.DataFrame({"narration_id": ["a"], "participant_id": ["P01"], "video_id": ["P01_01"]}),
                   progress=False)


# --- sampling ---------------------------------------------------------------------------------------------------


def _split_with_counts(counts, dim=4):
    """Segments of the given row counts laid out at rows 0, 100, 200, ...; features[r] = r."""
    rows = 100 * len(counts)
    features = torch.arange(rows, dtype=torch.float16).unsqueeze(1).repeat(1, dim)  # (rows, dim), exact below 2048
    n = len(counts)
    return PackedSplit(features=features, row_start=torch.arange(n) * 100, row_count=torch.tensor(counts),
                       verb_labels=None, noun_labels=None, narration_ids=[str(i) for i in range(n)],
                       participant_ids=["P01"] * n, video_ids=["P01_01"] * n)


def test_eval_takes_bin_centres():
    split = _split_with_counts([8, 3, 1])
    rows = split.sample_rows(torch.tensor([0, 1, 2]), 4, train=False)
    # count 8: bins [0,2) [2,4) [4,6) [6,8), centres 1, 3, 5, 7.
    # count 3: bins of 0.75 rows, centres 0.375, 1.125, 1.875, 2.625 -> rows 0, 1, 1, 2 (rows repeat).
    # count 1: every bin is row 0.
    assert rows.tolist() == [[1, 3, 5, 7], [100, 101, 101, 102], [200, 200, 200, 200]]
    assert rows.dtype == torch.int64
    assert split.segments_shorter_than(4) == 2


def test_train_draws_stay_inside_their_bins_cover_them_and_are_reproducible():
    split = _split_with_counts([8, 3, 1])
    segments = torch.tensor([0, 1, 2]).repeat(500)  # (1500,)
    rows = split.sample_rows(segments, 4, train=True, generator=torch.Generator().manual_seed(7))  # (1500, 4)
    allowed = {  # rows whose span [r, r+1) meets bin k = [k*count/4, (k+1)*count/4)
        0: [{0, 1}, {2, 3}, {4, 5}, {6, 7}],
        1: [{100}, {100, 101}, {101, 102}, {102}],
        2: [{200}, {200}, {200}, {200}],
    }
    for s, bins in allowed.items():
        drawn = rows[segments == s]  # (500, 4)
        for k, expected in enumerate(bins):
            assert set(drawn[:, k].tolist()) == expected  # inside the bin, and every row of it drawn
    again = split.sample_rows(segments, 4, train=True, generator=torch.Generator().manual_seed(7))
    other = split.sample_rows(segments, 4, train=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(rows, again) and not torch.equal(rows, other)


def test_gather_returns_the_sampled_rows():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(300, 2048)).astype(np.float16))
    split = _split_with_counts([8, 3, 1])
    split = dataclasses.replace(split, features=features)
    segments = torch.tensor([2, 0, 1, 0])
    batch = split.gather(segments, 4, train=False)
    assert batch.shape == (4, 4, 2048) and batch.dtype == torch.float16
    expected_rows = [[200] * 4, [1, 3, 5, 7], [100, 101, 101, 102], [1, 3, 5, 7]]
    assert torch.equal(batch, features[torch.tensor(expected_rows)])
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    train_batch = split.gather(segments, 4, train=True, generator=gen_a)
    assert torch.equal(train_batch, features[split.sample_rows(segments, 4, train=True, generator=gen_b)])
    moved = split.to("cpu")
    assert moved is not split and torch.equal(moved.gather(segments, 4, train=False), batch)


# --- context: the rows around a segment --------------------------------------------------------------------------


def test_context_rows_are_packed_around_each_segment_and_sampled_k_then_t_then_k(tmp_path):
    store = _MemoryStore({"P01_01": _video(np.arange(30) * 0.1, video_number=1)})  # rows 0..29 at 0.0 .. 2.9 s
    segments = _segments([("a", "P01_01", 1.0, 1.5), ("b", "P01_01", 0.0, 0.3), ("c", "P01_01", 2.7, 3.0)])
    split = pack_split(store, segments, context=Context(0.4, 2), progress=False)
    # a: rows 10..14, its context 6..9 (pts >= 0.6) and 15..18 (pts < 1.9); b starts the video, c ends it.
    assert split.context_before.tolist() == [4, 0, 4] and split.context_after.tolist() == [4, 4, 0]
    rows = split.gather(torch.arange(3), 4, train=False)[:, :, 0].long()  # (3, K + T + K) in-video row numbers
    assert rows.tolist() == [
        [7, 9, 10, 11, 13, 14, 16, 18],  # bin centres of each side's 4 rows, and of the segment's 5
        [0, 0, 0, 1, 1, 2, 4, 6],  # no row before the video's first: its edge row repeats
        [24, 26, 27, 28, 28, 29, 29, 29],  # ... nor after its last
    ]
    drawn = split.sample_rows(torch.zeros(200, dtype=torch.int64), 4, train=True,
                              generator=torch.Generator().manual_seed(0))  # (200, 8) packed positions of a
    in_video = split.features[drawn.reshape(-1), 0].long().reshape(200, 8)
    assert set(in_video[:, :2].flatten().tolist()) == {6, 7, 8, 9}  # training draws stay on their side
    assert set(in_video[:, 2:6].flatten().tolist()) == {10, 11, 12, 13, 14}
    assert set(in_video[:, 6:].flatten().tolist()) == {15, 16, 17, 18}
    without = pack_split(store, segments, progress=False)
    assert without.context_before is None and without.gather(torch.arange(3), 4, train=False).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="context_before / context_after"):
        dataclasses.replace(without, context=Context(0.4, 2))


def test_sequence_offsets_without_context_are_the_bin_offsets():
    counts = torch.tensor([5, 3])
    assert sequence_offsets(counts, 4, train=False).tolist() == [[0, 1, 3, 4], [0, 1, 1, 2]]
    with_context = sequence_offsets(counts, 4, train=False, before=torch.tensor([2, 0]), after=torch.tensor([0, 6]),
                                    context_frames=1)
    assert with_context.tolist() == [[-1, 0, 1, 3, 4, 4], [0, 0, 1, 1, 2, 6]]  # K = 1: each side's centre row
    with pytest.raises(ValueError, match="both be > 0 or both 0"):
        Context(1.0, 0)


# --- the real FeatureStore ----------------------------------------------------------------------------------------
def _store(tmp_path, *, feature_dim: int) -> FeatureStore:
    """An empty feature set of ``feature_dim`` rows under tmp_path/cache."""
    identity = FeatureSetIdentity(
        weights="random-seed0", weights_sha="0" * 16, fps=10.0, resize=128, crop=112,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), feature_dim=feature_dim,
        decoder="pyav-test", device="cpu", tf32=False, batch_size=8, channels_last=False, compile=False,
        fold_bn=True)
    return FeatureStore.create(tmp_path / "cache", identity)


def test_a_pack_with_context_is_cached_apart_from_one_without(tmp_path):
    store = _store(tmp_path, feature_dim=4)
    with store.writer("P01_01", attrs={"source_fps": 50.0, "duration": 3.0}) as writer:
        writer.append(_video(np.arange(30) / 10)[0], np.arange(30) / 10, np.arange(30) * 5)
        writer.commit()
    segments = _segments([("a", "P01_01", 1.0, 1.5, 1, 2)])
    plain = cached_pack_split(store, segments, "train", progress=False)
    context = cached_pack_split(store, segments, "train", context=Context(0.5, 2), progress=False)
    again = cached_pack_split(store, segments, "train", context=Context(0.5, 3), progress=False)  # same rows, K = 3
    assert len(list((tmp_path / "cache" / ".packed" / store.path.name).iterdir())) == 2
    assert len(plain.features) == 5 and len(context.features) == 15  # rows 5..19
    assert again.summary["loaded_from_cache"] == 1 and again.context == Context(0.5, 3)
    assert again.context_before.tolist() == [5] and again.context_after.tolist() == [5]
    assert again.gather(torch.tensor([0]), 2, train=False)[0, :, 0].tolist() == [5, 7, 9, 11, 13, 15, 17, 19]


# --- statistics -------------------------------------------------------------------------------------------------


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(2)
    values = (13 + 14 * rng.standard_normal((1000, 2048))).astype(np.float16)  # like random-weight features
    values[:, 5] = 7.0  # a constant dimension: std clamps to min_std
    split = PackedSplit(features=torch.from_numpy(values), row_start=torch.tensor([0]), row_count=torch.tensor([1000]),
                        verb_labels=None, noun_labels=None, narration_ids=["a"], participant_ids=["P01"],
                        video_ids=["P01_01"])
    mean, std = feature_stats(split, chunk_rows=128)  # 8 chunks: exercises the merge
    exact = values.astype(np.float64)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32 and mean.shape == (2048,)
    np.testing.assert_allclose(mean.numpy(), exact.mean(axis=0), rtol=1e-6, atol=1e-5)
    expected_std = np.maximum(exact.std(axis=0), 1e-3)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-6)
    assert std[5].item() == pytest.approx(1e-3) and mean[5].item() == 7.0


def test_feature_stats_are_the_float64_values_rounded_once_even_with_a_large_offset():
    # Mean 1000, spread 0.5 (float16 steps of 0.5 there): a naive float64 sum of squares would still be exact here,
    # a float32 one would cancel to nonsense. The result is the exact statistics rounded to float32 (within 1 ulp).
    rng = np.random.default_rng(5)
    values = (1000 + rng.integers(-2, 3, (3000, 64)) * 0.5).astype(np.float16)  # exactly representable rows
    split = PackedSplit(features=torch.from_numpy(values), row_start=torch.tensor([0]), row_count=torch.tensor([3000]),
                        verb_labels=None, noun_labels=None, narration_ids=["a"], participant_ids=["P01"],
                        video_ids=["P01_01"])
    mean, std = feature_stats(split, chunk_rows=512)  # the first 512 rows' mean is the shift, not the mean
    exact = values.astype(np.float64)
    np.testing.assert_array_max_ulp(mean.numpy(), exact.mean(axis=0).astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(std.numpy(), exact.std(axis=0).astype(np.float32), maxulp=1)


def test_pack_from_a_real_feature_store(tmp_path):
    store = _store(tmp_path, feature_dim=2048)
    rng = np.random.default_rng(3)
    videos = {}
    for video_id, n_rows in (("P01_01", 70), ("P01_02", 30)):
        pts = _rows_at_10_per_second_from(Fraction(60000, 1001), n_rows)
        features = rng.normal(size=(n_rows, 2048)).astype(np.float16)
        with store.writer(video_id, attrs={"fps": 59.94}) as writer:
            writer.append(features[:40], pts[:40], np.arange(min(40, n_rows)))
            if n_rows > 40:
                writer.append(features[40:], pts[40:], np.arange(40, n_rows))
            writer.commit()
        videos[video_id] = (features, pts)
    segments = _segments([
        ("a", "P01_01", 1.00, 1.50, 0, 1),  # rows 10..14
        ("b", "P01_02", 2.00, 9.00, 2, 3),  # rows 20..29, runs past the end (last row 2.9029)
        ("c", "P01_01", 5.60, 6.40, 4, 5),  # rows 56..63 across two appends
        ("d", "P09_01", 0.00, 1.00, 6, 7),  # never extracted
    ])
    split = pack_split(store, segments, progress=False)
    assert split.summary["past_end_clamped"] == 1 and split.missing_video_ids == ("P09_01",)
    expected = {0: videos["P01_01"][0][10:15], 1: videos["P01_02"][0][20:30], 2: videos["P01_01"][0][56:64]}
    for s, rows in expected.items():
        begin, count = int(split.row_start[s]), int(split.row_count[s])
        np.testing.assert_array_equal(split.features[begin:begin + count].numpy(), rows)
    assert split.feature_set == store.identity.to_dict()


def test_a_packed_split_is_cached_on_disk_and_repacked_when_its_inputs_change(tmp_path, monkeypatch):
    import epicfeat.temporal.data as data_module

    store = _store(tmp_path, feature_dim=4)
    rng = np.random.default_rng(0)
    for video_id in ("P01_01", "P01_02"):
        with store.writer(video_id, attrs={"source_fps": 50.0, "duration": 3.0}) as writer:
            writer.append(rng.normal(size=(30, 4)).astype(np.float16), np.arange(30) / 10, np.arange(30) * 5)
            writer.commit()
    segments = _segments([("a", "P01_01", 0.0, 1.0, 1, 2), ("b", "P01_02", 0.5, 2.0, 3, 4),
                          ("c", "P01_03", 0.0, 1.0, 0, 0)])  # P01_03 is not extracted (yet)
    packs = []
    real_pack = data_module.pack_split
    monkeypatch.setattr(data_module, "pack_split", lambda *a, **k: packs.append(1) or real_pack(*a, **k))

    first = cached_pack_split(store, segments, "train", progress=False)
    again = cached_pack_split(store, segments, "train", progress=False)
    assert len(packs) == 1  # the second call read the cache
    cached = sorted(p.name for p in (tmp_path / "cache" / ".packed" / store.path.name).iterdir())
    assert len(cached) == 1 and cached[0].startswith("train-")
    assert torch.equal(again.features, first.features) and again.features.dtype == torch.float16
    for name in ("row_start", "row_count", "verb_labels", "noun_labels"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name
    assert again.narration_ids == ["a", "b"] and again.missing_video_ids == ("P01_03",)
    assert again.summary["loaded_from_cache"] == 1 and again.feature_set == first.feature_set
    assert FeatureStore.list_sets(tmp_path / "cache")[0].path == store.path  # not taken for a set

    other_labels = segments.assign(verb_class=[2, 3, 0])
    assert cached_pack_split(store, other_labels, "train", progress=False).verb_labels.tolist() == [2, 3]
    with store.writer("P01_03", attrs={"source_fps": 50.0, "duration": 3.0}) as writer:  # the missing video arrives
        writer.append(rng.normal(size=(30, 4)).astype(np.float16), np.arange(30) / 10, np.arange(30) * 5)
        writer.commit()
    assert len(cached_pack_split(store, segments, "train", progress=False)) == 3
    assert len(packs) == 3  # new labels and a new video: each a fresh pack
