"""`epicfeat predict`: the streamed timeline equals a direct model call on the same windows; outputs; clear errors."""
import csv
import json
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from epicfeat.backbone import WeightsError, create_backbone, weights_name_of_sha
from epicfeat.encoder import FrameEncoder
from epicfeat.recipes import resolve_config
from epicfeat.frames import Preprocess, VideoError, iter_frames
from epicfeat.predict import (
    JsonlTimeline,
    LiveCapture,
    PredictConfig,
    PredictError,
    predict,
)
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

T, STRIDE, FPS = 8, 3, 10.0
PREPROCESS = Preprocess(resize=64, crop=56)
VERBS = ("take", "put", "open", "close", "wash", "cut")
NOUNS = ("cup", "knife", "tap", "plate", "pan", "door", "bag")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_timeline(path: Path) -> list[dict]:
    """A timeline written by ``predict`` as a list of records (CSV rows as dicts of strings; JSON Lines records)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            return list(csv.DictReader(f))
        return [json.loads(line) for line in f if line.strip()]


def _features(video: Path, backbone) -> tuple[torch.Tensor, np.ndarray]:
    """Every sampled frame's features, computed independently of predict: (rows, 2048) float16 and pts (rows,)."""
    features, pts = [], []
    for batch in iter_frames(video, fps=FPS, preprocess=PREPROCESS, batch_size=64):
        with torch.inference_mode():
            features.append(backbone(PREPROCESS.normalize(batch.images).contiguous()).to(torch.float16))
        pts.append(batch.pts)
    return torch.cat(features), np.concatenate(pts)


@pytest.fixture(scope="module")
def setup(synthetic_dataset, tmp_path_factory):
    """A short synthetic video, its reference features, and a tiny checkpoint trained (randomly) on that feature set."""
    torch.set_num_threads(1)
    video = min(Path(synthetic_dataset.videos).rglob("*.MP4"))
    backbone = create_backbone("random", seed=0)
    features, pts = _features(video, backbone)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=FPS,
                                  resize=PREPROCESS.resize, crop=PREPROCESS.crop, mean=PREPROCESS.mean,
                                  std=PREPROCESS.std, precision="fp32", decoder="pyav-test", device="cpu",
                                  tf32=False, batch_size=32, channels_last=False, compile=False, fold_bn=False)
    args = TemporalModelArgs(hidden=16, layers=1, n_verbs=len(VERBS), n_nouns=len(NOUNS))
    torch.manual_seed(0)
    # Standardise with the video's own statistics so that the random head gives spread-out, distinct scores.
    model = create_temporal_model(args, features.float().mean(0), features.float().std(0)).eval()
    card = ModelCard(config={"frames": T}, verb_classes=VERBS, noun_classes=NOUNS, feature_set=identity.to_dict(),
                     feature_set_key=identity.key())
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", model=model, card=card, epoch=1, metrics={},
                           history=[])
    return video, path, features, pts


def test_timeline_matches_direct_model_calls_on_the_same_windows(setup, tmp_path):
    """A window of T / fps seconds holds exactly T rows, and evaluate's bin centres of T rows are those rows: the
    windows are the last T consecutive rows."""
    video, checkpoint, features, pts = setup
    timeline = tmp_path / "timeline.jsonl"
    result = predict(PredictConfig(source=str(video), checkpoint=checkpoint, stride=STRIDE, timeline=timeline,
                                   window_seconds=T / FPS, batch_size=5, device="cpu", progress=False))
    rows = len(features)
    ends = list(range(T - 1, rows, STRIDE))  # last row of each window
    assert result.frames == rows and len(result.predictions) == len(ends) > 10

    model = load_checkpoint(checkpoint).create_model()
    windows = torch.stack([features[end - T + 1: end + 1] for end in ends])  # (P, T, 2048)
    with torch.inference_mode():
        verb_logits, noun_logits = model(windows)  # (P, Cv), (P, Cn)
    verb_probs, noun_probs = verb_logits.softmax(1).numpy(), noun_logits.softmax(1).numpy()

    records = read_timeline(timeline)
    run, predictions, summary = records[0], records[1:-1], records[-1]
    assert [r["type"] for r in records] == ["run"] + ["prediction"] * len(ends) + ["summary"]
    assert run["window"] == T and run["stride"] == STRIDE and summary["frames"] == rows and summary["error"] is None
    for p, end, vp, np_ in zip(predictions, ends, verb_probs, noun_probs):
        assert p["time"] == pytest.approx(pts[end]) and p["rows"] == T
        # Row i is sampling slot [i / fps, (i + 1) / fps): the window is the slots of rows end-T+1 .. end.
        assert p["window_end"] == pytest.approx((end + 1) / FPS) and p["window_start"] == pytest.approx(
            (end + 1 - T) / FPS)
        assert [v["class"] for v in p["verbs"]] == [VERBS[i] for i in np.argsort(-vp)[:5]]
        assert [n["class"] for n in p["nouns"]] == [NOUNS[i] for i in np.argsort(-np_)[:5]]
        np.testing.assert_allclose([v["score"] for v in p["verbs"]], np.sort(vp)[::-1][:5], atol=1e-4)
        np.testing.assert_allclose([n["score"] for n in p["nouns"]], np.sort(np_)[::-1][:5], atol=1e-4)
        # Actions: outer product of the two softmaxes (all classes fit in the official top-100).
        pairs = np.outer(vp, np_)  # (Cv, Cn)
        best = np.argsort(-pairs, axis=None)[:5]
        assert [(a["verb"], a["noun"]) for a in p["actions"]] == [(VERBS[i // len(NOUNS)], NOUNS[i % len(NOUNS)])
                                                                  for i in best]
        np.testing.assert_allclose([a["score"] for a in p["actions"]], pairs.reshape(-1)[best], atol=1e-4)
    # The scores are not degenerate (a model that ignores its input would pass the checks above trivially).
    assert len({p["verbs"][0]["class"] for p in predictions}) > 1


def test_csv_timeline_annotated_video_and_skip_frames(setup, tmp_path):
    video, checkpoint, features, _ = setup
    out_video, timeline = tmp_path / "annotated.mp4", tmp_path / "timeline.csv"
    config = PredictConfig(source=str(video), checkpoint=checkpoint, stride=2, skip_frames=1, timeline=timeline,
                           video_out=out_video, device="cpu", progress=False)
    result = predict(config)
    assert resolve_config(PredictConfig, config_file=tmp_path / "timeline.config.yaml") == config  # beside it
    # skip_frames=1 samples at 5 fps: half the 10 fps rows (targets k/5 s are every other 10 fps target).
    assert result.frames == (len(features) + 1) // 2
    rows = read_timeline(timeline)
    # The default 2 s window holds 10 rows at 5 fps: the first prediction is at row 9 (slot [1.8, 2.0)).
    assert len(rows) == len(result.predictions) == len(range(9, result.frames, 2))
    assert [int(r["rows"]) for r in rows] == [10] * len(rows)
    assert float(rows[0]["window_start"]) == 0.0 and float(rows[0]["window_end"]) == pytest.approx(2.0)
    assert rows[0]["verb1"] == result.predictions[0].verbs[0][0]
    assert float(rows[0]["action1_score"]) == pytest.approx(result.predictions[0].actions[0][2], rel=1e-5)
    assert float(rows[1]["time"]) - float(rows[0]["time"]) == pytest.approx(2 / 5, abs=0.02)

    # The annotated video: the source frames at their own size (192x108), one per sampled frame.
    with av.open(str(out_video)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (n, 108, 192, 3)
    with av.open(str(video)) as container:
        source = container.decode(video=0).__next__().to_ndarray(format="rgb24")  # (108, 192, 3), the first frame
    assert frames.shape == (result.frames, 108, 192, 3)
    # 192x108 -> resized 113x64, crop 56 at (28, 4): in source pixels the box (48, 7)-(143, 100), outlined yellow.
    bottom_edge = frames[0, 99:101, 60:130].reshape(-1, 3).mean(0)  # (3,) mean RGB of the 2-px outline
    assert bottom_edge[0] > 170 and bottom_edge[1] > 150 and bottom_edge[2] < 130, bottom_edge
    assert np.abs(source[99:101, 60:130].reshape(-1, 3).mean(0) - bottom_edge).max() > 60  # not the source's own
    # Away from the outline and the text panel, the picture is the source's (up to H.264 compression).
    inside = np.abs(frames[0, 60:95, 60:140].astype(int) - source[60:95, 60:140].astype(int)).mean()
    assert inside < 8, inside
    panel = frames[:, 2:30, 2:40]  # white text on a black box, top left
    assert panel.max() > 200 and np.median(panel) < 40
    summary = result.summary()
    assert summary["frames_per_second"] > 0 and summary["latency_ms_median"] > 0


def test_clear_errors(setup, tmp_path):
    video, checkpoint, _, _ = setup
    with pytest.raises(VideoError, match="file not found"):
        predict(PredictConfig(source=str(tmp_path / "missing.mp4"), checkpoint=checkpoint, device="cpu",
                              progress=False))
    with pytest.raises(WeightsError, match="trained on features of 'random-seed0'"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, weights="random", seed=1, device="cpu",
                              progress=False))
    with pytest.raises(PredictError, match="must end in .csv or .jsonl$"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, timeline=tmp_path / "t.txt", device="cpu"))
    with pytest.raises(PredictError, match="use .jsonl, JSON Lines"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, timeline=tmp_path / "t.json", device="cpu"))
    with pytest.raises(PredictError, match="holds no frame at 10 sampled frames/s"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, window_seconds=0.05, device="cpu"))
    with pytest.raises(Exception, match="does not exist"):
        predict(PredictConfig(source=str(video), checkpoint=tmp_path / "nope.pt", device="cpu"))


def test_cli_prints_the_summary_and_documents_the_window(setup, tmp_path):
    from typer.testing import CliRunner

    from epicfeat.cli import (
        app,
        commands,  # noqa: F401  (registers the commands)
    )

    video, checkpoint, _, _ = setup
    args = ["predict", str(video), "--checkpoint", str(checkpoint), "--timeline", str(tmp_path / "t.csv"),
            "--max-seconds", "2.0", "--window-seconds", str(T / FPS), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "20 frames through the backbone" in result.output and "frames/s sustained" in result.output
    assert "latency per prediction from decode" in result.output
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + len(range(T - 1, 20, 4))  # default stride 4
    helped = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert "--window-seconds" in " ".join(helped.split()) and "median EPIC-100 validation segment" in " ".join(
        helped.replace("│", " ").split())


def test_finetune_checkpoint_uses_its_own_backbone(setup, tmp_path):
    """A finetune checkpoint = a temporal checkpoint + 'backbone' state dict, feature set weights 'sha-<hash>'."""
    video, checkpoint, _, _ = setup
    tuned = create_backbone("random", seed=1)  # stands in for fine-tuned weights
    payload = torch.load(checkpoint, weights_only=True)
    payload["feature_set"] = {**payload["feature_set"], "weights": weights_name_of_sha(tuned.weights_sha),
                              "weights_sha": tuned.weights_sha}
    payload["backbone"] = tuned.state_dict()
    torch.save(payload, tmp_path / "ft.pt")
    result = predict(PredictConfig(source=str(video), checkpoint=tmp_path / "ft.pt", max_seconds=1.5,
                                   window_seconds=T / FPS, device="cpu", progress=False))
    assert result.frames == 15 and len(result.predictions) == len(range(T - 1, 15, 4))
    with pytest.raises(WeightsError, match="hash"):  # the seed-0 backbone is not the one the head was tuned with
        predict(PredictConfig(source=str(video), checkpoint=tmp_path / "ft.pt", weights="random", device="cpu",
                              progress=False))


# ------------------------------------------------------------------------------------ predict == evaluate
def _timestamp(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


@pytest.mark.parametrize("precision, head, context_seconds", [("fp32", "lstm", 0.0), ("bf16", "lstm", 0.0),
                                                              ("fp32", "transformer", 0.5)])
def test_a_segment_cut_as_a_window_gets_the_same_scores_from_predict_and_evaluate(synthetic_dataset, tmp_path,
                                                                                  precision, head, context_seconds):
    """extract + evaluate on segments [window_start, window_end) of predict's windows give predict's scores.

    A 1.5 s window at 10 fps holds 15 rows and T=8 bin centres ((2k + 1) * 15 // 16) read rows 0, 2, ..., 14: not the
    last 8 rows, so the test tells the two samplings apart. A run trained in bf16 is scored in bf16 by both. A head
    trained with context reads the same rows around the window as evaluate reads around the segment."""
    import pickle
    import shutil

    from epicfeat.data.annotations import EpicAnnotations
    from epicfeat.evaluate import EvaluateConfig, evaluate
    from epicfeat.extract import ExtractConfig, extract_features
    from epicfeat.predict import evaluation_offsets
    from epicfeat.temporal.train import open_feature_set

    assert evaluation_offsets(15, 8) == (0, 2, 4, 6, 8, 10, 12, 14)
    video_id, cache = "P01_01", tmp_path / "cache"
    extract_features(ExtractConfig(video_ids=(video_id,), videos=synthetic_dataset.videos, cache=cache,
                                   weights="random", resize=PREPROCESS.resize, crop=PREPROCESS.crop, fps=FPS,
                                   precision="fp32", batch_size=32, decode_workers=0, device="cpu", progress=False))
    store = open_feature_set(cache, None)
    stored = torch.from_numpy(np.asarray(store.read(video_id).features)).float()  # (rows, 2048)
    annotations = EpicAnnotations(synthetic_dataset.annotations)
    verbs, nouns = annotations.verbs.keys, annotations.nouns.keys
    args = TemporalModelArgs(head=head, frames=T, hidden=16, layers=1, width=16, attention_heads=4,
                             context_seconds=context_seconds, context_frames=3 if context_seconds else 0,
                             n_verbs=len(verbs), n_nouns=len(nouns))
    torch.manual_seed(1)
    model = create_temporal_model(args, stored.mean(0), stored.std(0)).eval()
    if model.context_marker is not None:
        torch.nn.init.normal_(model.context_marker)
    card = ModelCard(config={"frames": T, "precision": precision}, verb_classes=verbs, noun_classes=nouns,
                     feature_set=store.identity.to_dict(), feature_set_key=store.identity.key())
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=model, card=card, epoch=1, metrics={}, history=[])

    video = Path(synthetic_dataset.videos) / "P01" / f"{video_id}.MP4"
    result = predict(PredictConfig(source=str(video), checkpoint=checkpoint, window_seconds=1.5, stride=3,
                                   top_k=max(len(verbs), len(nouns)), device="cpu", progress=False))
    # Default batch size: the feature set's (32), short batches padded like extract's: bit-identical features.
    assert result.notes == [] and len(result.predictions) > 5 and {p.rows for p in result.predictions} == {15}
    # With context the window ends S seconds before the newest row: those rows are its context after it.
    assert all(p.time < p.window_end + context_seconds <= p.time + 0.1 + 1e-9 for p in result.predictions)

    # The validation split: one segment per prediction, cut exactly as its window.
    folder = tmp_path / "annotations"
    shutil.copytree(synthetic_dataset.annotations, folder)
    with open(folder / "EPIC_100_validation.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                         "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                         "noun_class", "all_nouns", "all_noun_classes"])
        for i, p in enumerate(result.predictions):
            start, stop = _timestamp(p.window_start), _timestamp(p.window_end)
            writer.writerow([f"{video_id}_w{i}", "P01", video_id, start, start, stop, round(p.window_start * 60),
                             round(p.window_end * 60), f"{verbs[0]} {nouns[0]}", verbs[0], 0, nouns[0], 0,
                             f"['{nouns[0]}']", "[0]"])
    scored = evaluate(EvaluateConfig(checkpoints=(checkpoint,), annotations=folder, cache=cache,
                                     out=tmp_path / "ev", device="cpu", progress=False))
    with open(scored.results_pickle, "rb") as f:
        results = pickle.load(f)  # per-row log-probabilities, float32
    assert list(results["narration_id"]) == [f"{video_id}_w{i}" for i in range(len(result.predictions))]
    for p, verb_log_probs, noun_log_probs in zip(result.predictions, results["verb_output"], results["noun_output"]):
        predicted_verbs = dict(p.verbs)  # every class (top_k covers them all)
        predicted_nouns = dict(p.nouns)
        np.testing.assert_allclose([predicted_verbs[v] for v in verbs], np.exp(verb_log_probs), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose([predicted_nouns[n] for n in nouns], np.exp(noun_log_probs), rtol=2e-6, atol=1e-7)
    verb_probs = np.array([[dict(p.verbs)[v] for v in verbs] for p in result.predictions])  # (windows, Cv)
    assert np.ptp(verb_probs, axis=0).max() > 1e-3  # the windows' scores differ: the comparison means something
    if head == "lstm":
        assert len({p.verbs[0][0] for p in result.predictions} | {p.nouns[0][0] for p in result.predictions}) > 2


# ------------------------------------------------------------------------------------------------ nothing lost
def _faststart_copy(video: Path, out: Path) -> Path:
    """The same stream remuxed with its index at the front, so that a cut copy opens and fails part-way."""
    with av.open(str(video)) as source, av.open(str(out), "w", options={"movflags": "faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    return out


def test_a_truncated_file_keeps_every_prediction_made_before_the_damage(setup, tmp_path, monkeypatch):
    video, checkpoint, _, _ = setup
    whole = _faststart_copy(video, tmp_path / "whole.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
    config = {"checkpoint": checkpoint, "window_seconds": T / FPS, "stride": 1, "batch_size": 4, "device": "cpu",
              "progress": False}
    reference = predict(PredictConfig(source=str(whole), **config))

    # The file is valid after every line: each prediction is on disk (and parses) as soon as it is made.
    timeline = tmp_path / "cut.jsonl"
    seen = []
    original = JsonlTimeline.write

    def write_and_read_back(self, prediction):
        original(self, prediction)
        seen.append(len(read_timeline(timeline)))  # every line so far parses

    monkeypatch.setattr(JsonlTimeline, "write", write_and_read_back)
    result = predict(PredictConfig(source=str(cut), timeline=timeline, **config))
    assert result.error is not None and str(cut) in result.error and "truncated or corrupt" in result.error
    assert result.error.startswith(f"stopped after {result.frames} frames")
    assert 0 < len(result.predictions) < len(reference.predictions)
    assert seen == list(range(2, len(result.predictions) + 2))  # the run record, then one line per prediction
    # What was done is what an undamaged copy gives for the same frames.
    assert result.predictions == reference.predictions[: len(result.predictions)]
    records = read_timeline(timeline)
    assert [r["type"] for r in records] == ["run"] + ["prediction"] * len(result.predictions) + ["summary"]
    assert records[-1]["error"] == result.error and records[-1]["frames"] == result.frames

    csv_timeline = tmp_path / "cut.csv"
    again = predict(PredictConfig(source=str(cut), timeline=csv_timeline, **config))
    assert len(read_timeline(csv_timeline)) == len(again.predictions) == len(result.predictions)


def test_an_error_before_the_first_frame_is_raised_and_writes_nothing(setup, tmp_path):
    video, checkpoint, _, _ = setup
    cut = tmp_path / "cut.MP4"  # index at the end: half a file cannot even be opened
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated or corrupt MP4"):
        predict(PredictConfig(source=str(cut), checkpoint=checkpoint, timeline=tmp_path / "t.csv", device="cpu",
                              progress=False))
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "t.config.yaml").exists()


# ------------------------------------------------------------------------------------------------ live sources
# FFmpeg's lavfi test pattern, paced to real time by its `realtime` filter: a camera that needs no hardware.
CAMERA = {"source": "testsrc2=size=640x360:rate=30,realtime", "camera_format": "lavfi"}


def test_a_live_source_that_the_model_keeps_up_with_loses_no_frame(setup, tmp_path):
    _, checkpoint, _, _ = setup
    timeline = tmp_path / "live.csv"
    result = predict(PredictConfig(**CAMERA, checkpoint=checkpoint, window_seconds=T / FPS, stride=1,
                                   max_seconds=2.0, timeline=timeline, device="cpu", progress=False))
    # 2 s of a 30 fps camera sampled at 10 fps: 20 rows, none dropped, a prediction for each from row T-1 on.
    assert result.live and result.frames == 20 and result.frames_dropped == 0 and result.error is None
    assert len(result.predictions) == len(read_timeline(timeline)) == 20 - T + 1
    assert [p.frame_index for p in result.predictions] == list(range(3 * (T - 1), 60, 3))  # every third frame
    assert [p.rows for p in result.predictions] == [T] * (20 - T + 1)
    summary = result.summary()
    assert summary["latency_from"] == "capture" and summary["frames_dropped"] == 0
    assert 0 < summary["latency_ms_median"] < 500 and result.seconds == pytest.approx(2.0, abs=0.6)


def test_a_live_source_builds_one_resizer_for_the_whole_stream(setup, monkeypatch):
    import epicfeat.predict

    _, checkpoint, _, _ = setup
    built = []

    class CountingResizer(epicfeat.predict.Resizer):
        def __init__(self, preprocess):
            built.append(preprocess)
            super().__init__(preprocess)

    monkeypatch.setattr(epicfeat.predict, "Resizer", CountingResizer)
    result = predict(PredictConfig(**CAMERA, checkpoint=checkpoint, window_seconds=T / FPS, max_seconds=1.0,
                                   device="cpu", progress=False))
    assert result.frames == 10 and len(built) == 1


def test_a_model_slower_than_the_camera_drops_frames_instead_of_falling_behind(setup, monkeypatch):
    _, checkpoint, _, _ = setup
    original = FrameEncoder.encode

    def slow(self, images, **kwargs):  # 4 frames/s at batch 1: slower than the 10 frames/s sampled
        time.sleep(0.25)
        return original(self, images, **kwargs)

    monkeypatch.setattr(FrameEncoder, "encode", slow)
    result = predict(PredictConfig(**CAMERA, checkpoint=checkpoint, window_seconds=T / FPS, stride=1,
                                   max_seconds=3.0, device="cpu", progress=False))
    # 30 rows were sampled; about 4 per second got through, the rest were dropped (at most one waits at the end).
    assert 6 <= result.frames <= 16 and result.frames_dropped >= 12
    assert 28 <= result.frames + result.frames_dropped <= 30
    # Latency stays at about one or two model calls (a queue would grow it by 0.15 s per frame, to > 2 s here).
    assert result.latencies and max(result.latencies) < 0.8, result.latencies
    assert result.summary()["frames_dropped"] == result.frames_dropped


def test_a_camera_that_disconnects_ends_the_run_keeping_what_was_done(setup, tmp_path, monkeypatch):
    _, checkpoint, _, _ = setup
    original = LiveCapture._frames

    def unplugged_after_45_frames(self):
        for count, frame in enumerate(original(self)):
            if count == 45:
                raise OSError(5, "Input/output error")
            yield frame

    monkeypatch.setattr(LiveCapture, "_frames", unplugged_after_45_frames)
    timeline = tmp_path / "live.jsonl"
    result = predict(PredictConfig(**CAMERA, checkpoint=checkpoint, window_seconds=T / FPS, stride=1,
                                   timeline=timeline, device="cpu", progress=False))
    assert result.frames + result.frames_dropped == 15  # frames 0, 3, ..., 42
    assert "capture stopped (OSError: [Errno 5] Input/output error)" in result.error
    assert "testsrc2" in result.error and result.error.startswith(f"stopped after {result.frames} frames")
    records = read_timeline(timeline)
    assert len(records) == 2 + len(result.predictions) and records[-1]["error"] == result.error


def test_a_live_annotated_video_has_the_camera_frames_at_their_own_size(setup, tmp_path):
    _, checkpoint, _, _ = setup
    out_video = tmp_path / "live.mp4"
    result = predict(PredictConfig(**CAMERA, checkpoint=checkpoint, window_seconds=T / FPS, max_seconds=1.0,
                                   video_out=out_video, device="cpu", progress=False))
    with av.open(str(out_video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert result.frames == len(frames) == 10 and frames[0].shape == (360, 640, 3)


def test_an_annotated_video_without_pillow_is_a_clear_error(setup, tmp_path, monkeypatch):
    import sys

    video, checkpoint, _, _ = setup
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail, installed or not
    with pytest.raises(PredictError, match=r"Pillow, which epicfeat depends on but this environment lacks: pip install Pillow"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, video_out=tmp_path / "a.mp4", device="cpu"))
    assert not (tmp_path / "a.mp4").exists()
