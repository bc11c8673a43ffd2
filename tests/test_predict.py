"""`epicfeat predict`: the streamed timeline equals a direct model call on the same windows; outputs; clear errors."""
import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from epicfeat.backbone import WeightsError, create_backbone
from epicfeat.config import resolve_config
from epicfeat.frames import Preprocess, VideoError, iter_frames
from epicfeat.predict import PredictConfig, PredictError, predict
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

T, STRIDE, FPS = 8, 3, 10.0
PREPROCESS = Preprocess(resize=64, crop=56)
VERBS = ("take", "put", "open", "close", "wash", "cut")
NOUNS = ("cup", "knife", "tap", "plate", "pan", "door", "bag")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    video = sorted(Path(synthetic_dataset.videos).rglob("*.MP4"))[0]
    backbone = create_backbone("random", seed=0)
    features, pts = _features(video, backbone)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=FPS,
                                  resize=PREPROCESS.resize, crop=PREPROCESS.crop, mean=PREPROCESS.mean,
                                  std=PREPROCESS.std, precision="fp32")
    args = TemporalModelArgs(hidden=16, layers=1, n_verbs=len(VERBS), n_nouns=len(NOUNS))
    torch.manual_seed(0)
    # Standardise with the video's own statistics so that the random head gives spread-out, distinct scores.
    model = create_temporal_model(args, features.float().mean(0), features.float().std(0)).eval()
    path = save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best.pt", model=model, model_args=args, config={"frames": T},
        verb_classes=VERBS, noun_classes=NOUNS, feature_set=identity.to_dict(), feature_set_key=identity.key(),
        epoch=1, metrics={}, history=[],
    )
    return video, path, features, pts


def test_timeline_matches_direct_model_calls_on_the_same_windows(setup, tmp_path):
    video, checkpoint, features, pts = setup
    timeline = tmp_path / "timeline.json"
    result = predict(PredictConfig(source=str(video), checkpoint=checkpoint, stride=STRIDE, timeline=timeline,
                                   batch_size=5, progress=False))
    rows = len(features)
    ends = list(range(T - 1, rows, STRIDE))  # last row of each window
    assert result.frames == rows and len(result.predictions) == len(ends) > 10

    model = load_checkpoint(checkpoint).create_model()
    windows = torch.stack([features[end - T + 1: end + 1] for end in ends])  # (P, T, 2048)
    with torch.inference_mode():
        verb_logits, noun_logits = model(windows)  # (P, Cv), (P, Cn)
    verb_probs, noun_probs = verb_logits.softmax(1).numpy(), noun_logits.softmax(1).numpy()

    document = json.loads(timeline.read_text())
    assert document["window"] == T and document["stride"] == STRIDE and document["summary"]["frames"] == rows
    assert len(document["predictions"]) == len(ends)
    for p, end, vp, np_ in zip(document["predictions"], ends, verb_probs, noun_probs):
        assert p["time"] == pytest.approx(pts[end]) and p["window_start"] == pytest.approx(pts[end - T + 1])
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
    assert len({p["verbs"][0]["class"] for p in document["predictions"]}) > 1


def test_csv_timeline_annotated_video_and_skip_frames(setup, tmp_path):
    video, checkpoint, features, _ = setup
    out_video, timeline = tmp_path / "annotated.mp4", tmp_path / "timeline.csv"
    config = PredictConfig(source=str(video), checkpoint=checkpoint, stride=2, skip_frames=1, timeline=timeline,
                           video_out=out_video, progress=False)
    result = predict(config)
    assert resolve_config(PredictConfig, config_file=tmp_path / "timeline.config.yaml") == config  # beside it
    # skip_frames=1 samples at 5 fps: half the 10 fps rows (targets k/5 s are every other 10 fps target).
    assert result.frames == (len(features) + 1) // 2
    with open(timeline, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.predictions) == len(range(T - 1, result.frames, 2))
    assert rows[0]["verb1"] == result.predictions[0].verbs[0][0]
    assert float(rows[0]["action1_score"]) == pytest.approx(result.predictions[0].actions[0][2], rel=1e-5)
    assert float(rows[1]["time"]) - float(rows[0]["time"]) == pytest.approx(2 / 5, abs=0.02)
    with av.open(str(out_video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == result.frames
    assert frames[0].shape[1:] == (56, 3) and frames[0].shape[0] > 56  # the crop on top of a text panel
    panel = np.stack(frames)[:, 56:]  # (n, panel, 56, 3): white text on black
    assert panel.max() > 200 and np.median(panel) < 30
    summary = result.summary()
    assert summary["frames_per_second"] > 0 and summary["latency_ms_median"] > 0


def test_clear_errors(setup, tmp_path):
    video, checkpoint, _, _ = setup
    with pytest.raises(VideoError, match="file not found"):
        predict(PredictConfig(source=str(tmp_path / "missing.mp4"), checkpoint=checkpoint, progress=False))
    with pytest.raises(WeightsError, match="trained on features of 'random-seed0'"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, weights="random", seed=1, progress=False))
    with pytest.raises(PredictError, match="must end in .csv or .json"):
        predict(PredictConfig(source=str(video), checkpoint=checkpoint, timeline=tmp_path / "t.txt"))
    with pytest.raises(Exception, match="does not exist"):
        predict(PredictConfig(source=str(video), checkpoint=tmp_path / "nope.pt"))


def test_cli_resolves_configs_predict_yaml_and_prints_the_summary(setup, tmp_path, capsys):
    from epicfeat.cli.predict import predict as cli_predict

    video, checkpoint, _, _ = setup
    cli_predict(str(video), checkpoint=checkpoint, timeline=tmp_path / "t.csv", max_seconds=2.0, progress=False)
    out = capsys.readouterr().out
    assert "20 frames through the backbone" in out and "frames/s sustained" in out and "latency" in out
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + len(range(T - 1, 20, 4))  # default stride 4


def test_finetune_checkpoint_uses_its_own_backbone(setup, tmp_path):
    """A finetune checkpoint = a temporal checkpoint + 'backbone' state dict, feature set weights 'file:<name>'."""
    video, checkpoint, _, _ = setup
    tuned = create_backbone("random", seed=1)  # stands in for fine-tuned weights
    payload = torch.load(checkpoint, weights_only=True)
    payload["feature_set"] = {**payload["feature_set"], "weights": "file:ft.pt", "weights_sha": tuned.weights_sha}
    payload["backbone"] = tuned.state_dict()
    torch.save(payload, tmp_path / "ft.pt")
    result = predict(PredictConfig(source=str(video), checkpoint=tmp_path / "ft.pt", max_seconds=1.5, progress=False))
    assert result.frames == 15 and len(result.predictions) == len(range(T - 1, 15, 4))
    with pytest.raises(WeightsError, match="hash"):  # the seed-0 backbone is not the one the head was tuned with
        predict(PredictConfig(source=str(video), checkpoint=tmp_path / "ft.pt", weights="random", progress=False))
