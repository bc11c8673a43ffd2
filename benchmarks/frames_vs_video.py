"""Rows per second from EPIC-100's official JPEG frames beside rows per second from the same video, in one process.

    python benchmarks/frames_vs_video.py                 # 20 s of 640x360 video at 59.94 fps (about 1 minute)
    python benchmarks/frames_vs_video.py --seconds 60 --workdir /tmp/fvv

The decode room alone (``decode_video``: decode, resize, centre crop; the backbone is the same for every form): a
synthetic H.264 video, and its frames as the official ones are made (resampled to 60 fps, scaled to 456x256) in a
tar and in a folder. Measured interleaved (the machine is shared), medians of ``--repeats``, one codec thread (the
JPEG decoder uses one; decode processes are the parallelism). ``bench_extract`` calls ``frames_vs_video``.
"""
from __future__ import annotations

import statistics

from common import add_workdir, machine_line, new_parser, synthetic_video, table, work_folder

from epicfeat.data.synthetic import video_as_frames
from epicfeat.frames import DecodeSettings, Preprocess, VideoJob, decode_rows_per_second

OFFICIAL_SIZE = (456, 256)  # the official RGB frames
OFFICIAL_FPS = 60.0  # EPIC-55 ids


def frames_vs_video(workdir, *, seconds: float = 20.0, width: int = 640, height: int = 360,
                    rates: tuple[float | None, ...] = (10.0, None), repeats: int = 3) -> dict:
    """{rows per second of video (None: every frame): {form: rows/s}}, the forms measured side by side."""
    video = synthetic_video(workdir / f"P01_01_{width}x{height}_{seconds:g}s.MP4", seconds=seconds, width=width,
                            height=height)
    jobs = {f"video {width}x{height} H.264": VideoJob("P01_01", video)}
    for kind in ("tar", "folder"):
        frames = workdir / f"P01_01_{width}x{height}_{seconds:g}s_frames{'.tar' if kind == 'tar' else ''}"
        if not frames.exists():
            video_as_frames(video, frames, rate=OFFICIAL_FPS, size=OFFICIAL_SIZE)
        jobs[f"frames 456x256 ({kind})"] = VideoJob("P01_01", frames, frames_fps=OFFICIAL_FPS)
    report = {}
    for fps in rates:
        settings = DecodeSettings(fps, Preprocess(), batch_size=64, threads=1)
        measured = {name: [] for name in jobs}
        for _ in range(repeats):
            for name, job in jobs.items():
                measured[name].append(decode_rows_per_second(job, settings))
        report["every frame" if fps is None else f"{fps:g} rows/s"] = {
            name: statistics.median(values) for name, values in measured.items()}
    return report


def main() -> None:
    parser = new_parser(__doc__)
    add_workdir(parser, "the video and its frames")
    parser.add_argument("--seconds", type=float, default=20.0, help="video length (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    args = parser.parse_args()
    print(machine_line())
    with work_folder(args.workdir, "frames_vs_video_") as workdir:
        report = frames_vs_video(workdir, seconds=args.seconds, repeats=args.repeats)
    forms = list(next(iter(report.values())))
    print(table(["rows", *forms, "frames (tar) / video"],
                [[rate, *(f"{values[form]:,.0f}" for form in forms),
                  f"{values[forms[1]] / values[forms[0]]:.2f}x"] for rate, values in report.items()]))


if __name__ == "__main__":
    main()
