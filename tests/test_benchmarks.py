"""The benchmarks' shared module (benchmarks/common.py), the synthetic test video it makes, and the pieces of
bench_temporal.py that lay out splits and call the real training loop (so a change of the loop's API shows here,
not first on a lent GPU machine)."""
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch

from epicfeat.data import synthetic
from epicfeat.data.synthetic import SyntheticDatasetError, write_synthetic_video

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def _frames_of(path: Path) -> tuple[int, tuple[int, int], object]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, (stream.codec_context.width, stream.codec_context.height), stream.average_rate


# --- the synthetic test video ---------------------------------------------------------------------------------


def test_write_synthetic_video_has_the_asked_frames_size_and_rate(tmp_path):
    path = write_synthetic_video(tmp_path / "a.mp4", seconds=1.0, width=96, height=54, fps="30")
    assert _frames_of(path) == (30, (96, 54), 30)
    ntsc = write_synthetic_video(tmp_path / "b.mp4", seconds=0.5, width=96, height=54, fps="60000/1001")
    count, _, rate = _frames_of(ntsc)
    assert count == 30 and str(rate) == "60000/1001"  # round(0.5 * 59.94) frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no partial file left behind


def test_write_synthetic_video_same_arguments_same_bytes(tmp_path):
    first = write_synthetic_video(tmp_path / "1.mp4", seconds=0.4, width=96, height=54, fps="50", seed=3)
    again = write_synthetic_video(tmp_path / "2.mp4", seconds=0.4, width=96, height=54, fps="50", seed=3)
    other = write_synthetic_video(tmp_path / "3.mp4", seconds=0.4, width=96, height=54, fps="50", seed=4)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()


@pytest.mark.parametrize("seconds", [0, -1.0])
def test_write_synthetic_video_refuses_no_duration(tmp_path, seconds):
    with pytest.raises(SyntheticDatasetError, match="seconds must be > 0"):
        write_synthetic_video(tmp_path / "x.mp4", seconds=seconds)
    assert not any(tmp_path.iterdir())


def test_synthetic_video_is_reused_only_when_made_the_same_way(tmp_path, monkeypatch):
    made = []
    real = synthetic.write_synthetic_video

    def counting(path, **kwargs):
        made.append(kwargs["seed"])
        return real(path, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic_video", counting)
    path = tmp_path / "P01" / "P01_01.MP4"
    for seed in (0, 0, 1, 1):
        assert common.synthetic_video(path, seconds=0.4, width=96, height=54, fps="30", seed=seed) == path
    assert made == [0, 1]
    assert _frames_of(path)[0] == 12
    sidecar = path.with_name("P01_01.MP4.json")
    assert sidecar.read_text() == ('{"seconds": 0.4, "width": 96, "height": 54, "fps": "30", "seed": 1, '
                                   f'"generator": {synthetic.GENERATOR_VERSION}}}\n')
    sidecar.unlink()  # a video without its record (e.g. killed before it was written) is made again
    common.synthetic_video(path, seconds=0.4, width=96, height=54, fps="30", seed=1)
    assert made == [0, 1, 1]


# --- folders, machine, printing -------------------------------------------------------------------------------


def test_work_folder_keeps_a_given_folder_and_removes_a_temporary_one(tmp_path):
    with common.work_folder(tmp_path / "kept", "x-") as folder:
        (folder / "f").write_text("1")
    assert (tmp_path / "kept" / "f").read_text() == "1"
    with pytest.raises(RuntimeError):
        with common.work_folder(None, "epicfeat-test-") as temporary:
            assert temporary.is_dir() and temporary.name.startswith("epicfeat-test-")
            raise RuntimeError("a benchmark failed")
    assert not temporary.exists()  # removed even when the block fails


def test_machine_line_says_native_bf16(monkeypatch):
    monkeypatch.setattr(common, "cpu_name", lambda: "Some CPU")
    monkeypatch.setattr(common, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    line = common.machine_line()
    assert line.startswith("CPU: Some CPU, native bf16: yes, ") and line.endswith(f"torch {torch.__version__}, 3 threads")
    monkeypatch.setattr(common, "native_bf16_cpu", lambda: False)
    assert ", native bf16: no, " in common.machine_line()


def test_gpu_device_skips_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.gpu_device("cuda") is None
    assert capsys.readouterr().out == "GPU: skipped, PyTorch sees no CUDA device here\n"
    assert common.gpu_device("cpu") == torch.device("cpu")  # a dry run of a GPU section
    assert capsys.readouterr().out == ""


def test_verdict_row_and_table(capsys):
    assert common.verdict(0.95, 0.95) == "PASS" and common.verdict(0.949, 0.95) == "FAIL"
    assert common.verdict(0.10, 0.10, at_least=False) == "PASS" and common.verdict(0.2, 0.1, at_least=False) == "FAIL"
    common.row("model share", "0.970", "note")
    common.row("peak", "1.0 GiB")
    assert capsys.readouterr().out == (f"  {'model share':<46} {'0.970':>16}  note\n"
                                       f"  {'peak':<46} {'1.0 GiB':>16}\n")
    assert common.table(["what", "rows/s"], [["decode", 12.5], ["model x", 8]]) == (
        "  what     rows/s\n"
        "  -------  ------\n"
        "  decode     12.5\n"
        "  model x       8")


def test_parsers_share_the_common_options():
    import bench_predict
    import bench_temporal

    args = bench_temporal.parse_args(["--gpu", "--workdir", "w"])
    assert (args.gpu, args.workdir, args.seed, args.annotations) == (True, Path("w"), 0, common.SHARED_ANNOTATIONS)
    assert args.gpu_device == "cuda"  # the temporal GPU section's CPU dry run (small splits) is --gpu-device cpu
    args = bench_predict.parse_args(["--gpu"])
    assert (args.gpu, args.device) == (True, "cuda")


# --- bench_temporal: splits without Zarr, and the real loop -----------------------------------------------------


def _segments(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["video_id", "participant_id", "start_sec", "stop_sec", "verb_class",
                                       "noun_class"])


def test_epic_row_layout_and_layout_split_by_hand():
    import bench_temporal as bt

    video_info = pd.DataFrame({"duration": [1.05, 2.0]}, index=["P01_01", "P02_01"])  # 11 and 20 rows
    segments = _segments([("P01_01", "P01", 0.0, 0.5, 3, 7),  # rows 0..4
                          ("P02_01", "P02", 1.95, 2.5, 1, 2),  # row 19 of P02_01 (past its end: clamped)
                          ("P01_01", "P01", 1.2, 1.3, 0, 0)])  # starts past P01_01's 11 rows: its last row
    start, count, total = bt.epic_row_layout(segments, video_info)
    assert start.tolist() == [0, 11 + 19, 10] and count.tolist() == [5, 1, 1] and total == 31
    features = torch.arange(31 * 2, dtype=torch.float16).reshape(31, 2)  # (31, 2)
    split = bt.layout_split(features, segments, video_info)
    assert split.verb_labels.tolist() == [3, 1, 0] and split.noun_labels.tolist() == [7, 2, 0]
    assert split.participant_ids == ["P01", "P02", "P01"] and split.narration_ids == ["0", "1", "2"]
    assert split.gather(torch.tensor([1]), 2, train=False)[0].tolist() == [[60.0, 61.0], [60.0, 61.0]]  # row 30
    first = bt.first_segments(split, 2)
    assert len(first) == 2 and first.features is features and first.video_ids == ["P01_01", "P02_01"]


def test_compact_split_holds_each_segments_own_rows():
    import bench_temporal as bt

    segments = _segments([("V", "P01", 0.0, 0.34, 0, 1), ("V", "P01", 5.0, 5.01, 1, 0), ("W", "P02", 0, 1.0, 2, 2)])
    split = bt.compact_split(segments, torch.Generator().manual_seed(0), "cpu")
    assert split.row_count.tolist() == [3, 1, 10] and split.row_start.tolist() == [0, 3, 4]
    assert split.features.shape == (14, bt.FEATURE_DIM) and split.features.dtype == torch.float16


@pytest.mark.usefixtures("one_torch_thread")
def test_time_real_loop_runs_train_one_epoch_and_evaluate(capsys):
    import bench_temporal as bt

    rows = [("V", "P01", 0.1 * i, 0.1 * i + 0.5, i % 3, i % 2) for i in range(6)]
    generator = torch.Generator().manual_seed(0)
    train = bt.compact_split(_segments(rows), generator, "cpu")
    validation = bt.compact_split(_segments(rows[:3]), generator, "cpu")
    result = bt.time_real_loop(train, validation, n_verbs=3, n_nouns=2, precision="fp32", device=torch.device("cpu"),
                               frames=4, batch_size=4, micro_batch_size=2, seed=0, warmup_segments=2, repeats=1)
    assert (result["precision"], result["segments"], result["val_segments"], result["steps"]) == ("fp32", 6, 3, 2)
    assert result["model_share"] == pytest.approx(result["model_step"] * 2 / result["epoch"])
    assert 0 < result["loop_own_work"] < result["epoch"]  # the same loop around a near-empty model
    assert np.isfinite(result["train_loss"]) and 0 <= result["val_action"] <= 100
    bt.print_real_loop([result, {**result, "precision": "bf16"}], "CPU")
    out = capsys.readouterr().out
    assert "fp32: 6 train / 3 val segments, 2 steps" in out and "bf16 vs fp32: epoch speed-up" in out
    assert "target >= 0.95 on the CPU (" in out and "the loop alone (near-empty model)" in out


def test_epic_size_splits_lay_out_every_video_and_repeat_the_train_segments(synthetic_dataset):
    import bench_temporal as bt
    from epicfeat.data.annotations import EpicAnnotations

    annotations = EpicAnnotations(synthetic_dataset.annotations)
    real_train, real_validation = annotations.segments("train"), annotations.segments("validation")
    train, validation = bt.epic_size_splits(annotations, torch.device("cpu"), seed=0, train_segments=20)
    rows = int(np.ceil(annotations.video_info["duration"].to_numpy() * bt.ROWS_PER_SECOND).sum())
    assert train.features is validation.features and train.features.shape == (rows, bt.FEATURE_DIM)
    assert len(train) == 20 and len(validation) == len(real_validation)
    repeats = np.arange(20) % len(real_train)
    assert train.video_ids == real_train["video_id"].iloc[repeats].tolist()
    assert train.verb_labels.tolist() == real_train["verb_class"].iloc[repeats].tolist()
    for split in (train, validation):
        assert int((split.row_start + split.row_count).max()) <= rows and int(split.row_count.min()) >= 1
