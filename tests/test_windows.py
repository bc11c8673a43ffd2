"""Clip rows of video backbones: centres on the row grid, clip_len consecutive frames, padded at the ends, each
frame decoded once whatever the overlap, the same rows however the decoded frames are batched."""
import numpy as np

from epicfeat.frames import FrameBatch
from epicfeat.windows import ClipWindows, clip_decoding


def _frames(n: int, rate: int = 15) -> FrameBatch:
    """n frames at ``rate`` fps; frame i's pixels all equal i, its stream position 2 i (every other frame kept)."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3)).copy()
    return FrameBatch(frame_indices=np.arange(n) * 2, pts=np.arange(n) / rate, images=images)


def _run(frames: FrameBatch, sizes: list[int], **kwargs):
    windows, batches, start = ClipWindows(**kwargs), [], 0
    for size in sizes:
        part = FrameBatch(frames.frame_indices[start:start + size], frames.pts[start:start + size],
                          frames.images[start:start + size])
        batches += windows.add(part)
        start += size
    return batches + windows.end()


def test_rows_are_clips_centred_on_the_row_grid_and_padded_at_the_ends():
    frames = _frames(15)  # 1 s at 15 fps; rows at 10 fps: targets 0, 0.1, ..., 0.9 s
    batches = _run(frames, [15], clip_len=4, step=1, fps=10.0, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    centres = np.concatenate([b.frame_indices for b in batches]) // 2  # frame numbers
    # the first frame at or after k / 10 s: frame ceil(1.5 k)
    assert centres.tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14]
    clips = np.concatenate([b.images[:, :, 0, 0, 0] for b in batches])  # (rows, clip_len) frame numbers
    assert clips[0].tolist() == [0, 0, 0, 1]  # 2 before the centre, 1 after; frame 0 repeats at the start
    assert clips[3].tolist() == [3, 4, 5, 6]
    assert clips[-1].tolist() == [12, 13, 14, 14]  # the last frame repeats at the end
    pts = np.concatenate([b.pts for b in batches])
    np.testing.assert_array_equal(pts, centres / 15)
    span = np.concatenate([b.span for b in batches])
    np.testing.assert_array_equal(span[3], [3 / 15, 6 / 15])
    np.testing.assert_array_equal(span[0], [0.0, 1 / 15])


def test_the_rows_do_not_depend_on_how_the_decoded_frames_are_batched():
    frames = _frames(100)
    whole = _run(frames, [100], clip_len=16, step=1, fps=10.0, batch_size=8)
    pieces = _run(frames, [1] * 100, clip_len=16, step=1, fps=10.0, batch_size=8)
    ragged = _run(frames, [7, 30, 1, 62], clip_len=16, step=1, fps=10.0, batch_size=8)
    for other in (pieces, ragged):
        assert [len(b) for b in other] == [len(b) for b in whole]
        for a, b in zip(whole, other):
            for name in ("frame_indices", "pts", "span", "images"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert sum(len(b) for b in whole) == 67  # ceil(100 / 15 * 10): rows at 10 per second


def test_only_the_frames_pending_rows_need_are_kept():
    windows = ClipWindows(clip_len=16, step=1, fps=10.0, batch_size=4)
    frames = _frames(300)
    most = 0
    for i in range(300):
        windows.add(FrameBatch(frames.frame_indices[i:i + 1], frames.pts[i:i + 1], frames.images[i:i + 1]))
        most = max(most, len(windows._images))
    assert most <= 16 + 4 * 15 // 10 + 2  # one clip plus the centres of one batch of rows


def test_clips_slower_than_the_rows_take_every_step_th_decoded_frame():
    """7.5-fps clips (MViT's) at 10 rows/s: decoded at 15 fps, each clip takes every second frame, so its frames
    stay 1 / 7.5 s apart and each row still has its own centre."""
    assert [clip_decoding(*rates) for rates in ((7.5, 10.0), (15.0, 10.0), (15.0, 15.0), (15.0, 30.0))] == \
        [(2, 15.0), (1, 15.0), (1, 15.0), (2, 30.0)]
    frames = _frames(30)  # 2 s at 15 fps
    batches = _run(frames, [30], clip_len=4, step=2, fps=10.0, batch_size=4)
    centres = np.concatenate([b.frame_indices for b in batches]) // 2
    assert centres.tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29]
    clips = np.concatenate([b.images[:, :, 0, 0, 0] for b in batches])  # (rows, 4) frame numbers
    assert clips[3].tolist() == [1, 3, 5, 7]  # 2 before the centre (frame 5), 1 after, 2 frames apart
    assert clips[0].tolist() == [0, 0, 0, 2] and clips[-1].tolist() == [25, 27, 29, 29]
