"""`epicfeat demo` end to end on the tiny synthetic dataset: every artefact exists and a re-run reuses the work."""
import json
import zipfile

import pytest

from epicfeat.data.annotations import EpicAnnotations
from epicfeat.demo import DemoConfig, run_demo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_runs_every_stage_and_resumes(tmp_path):
    config = DemoConfig(out=tmp_path / "demo", dataset="tiny", resize=64, crop=56, frames=(1, 4, 8), hidden=16,
                        epochs=1, batch_size=8, device="cpu", progress=False)
    result = run_demo(config)

    annotations = EpicAnnotations(result.dataset / "annotations")
    assert list(result.metrics) == ["1-frame", "4-frame", "8-frame", "ensemble 4f+8f"]
    for metrics in result.metrics.values():
        assert 0 <= metrics["all_action_accuracy_at_1"] <= metrics["all_action_accuracy_at_5"] <= 100
    for frames, checkpoint in result.checkpoints.items():
        assert checkpoint.is_file() and checkpoint.parent.name == f"temporal_{frames}f"
        assert len((checkpoint.parent / "metrics.csv").read_text().splitlines()) == 1 + 1  # header + 1 epoch
    saved = json.loads((result.evaluation / "metrics.json").read_text())
    assert [m["frames"] for m in saved["members"]] == [4, 8]
    with zipfile.ZipFile(result.submission) as archive:
        submission = json.loads(archive.read("test.json"))
    assert list(submission["results"]) == annotations.segments("test")["narration_id"].tolist()
    assert (config.out / "config.yaml").is_file()
    saved_results = json.loads((config.out / "results.json").read_text())
    assert json.dumps(saved_results["metrics"]) == json.dumps(result.metrics)
    assert set(saved_results["checkpoints"]) == {"1-frame", "4-frame", "8-frame"}
    timeline = next(result.deploy.glob("*_timeline.csv")).read_text().splitlines()
    assert len(timeline) > 1 and result.predict_fps > 0
    assert set(result.onnx_max_abs_diff) == {"temporal_head", "full_model"}
    assert all(diff < 2e-3 for diff in result.onnx_max_abs_diff.values())

    # a second run reuses the dataset, the features and the finished training runs
    before = {path: path.stat().st_mtime_ns for path in result.checkpoints.values()}
    again = run_demo(config)
    assert {path: path.stat().st_mtime_ns for path in again.checkpoints.values()} == before
    assert json.dumps(again.metrics) == json.dumps(result.metrics)  # NaN (empty tail subsets) included


def test_demo_from_frames(tmp_path):
    """`epicfeat demo --source frames`: the dataset's official frames (folders and tars) feed the whole pipeline."""
    config = DemoConfig(out=tmp_path / "demo", dataset="tiny", source="frames", resize=64, crop=56, frames=(1, 4),
                        hidden=16, epochs=1, batch_size=8, device="cpu", progress=False)
    result = run_demo(config)
    from epicfeat.store import FeatureStore

    store = FeatureStore.open(result.feature_set)
    assert store.identity.source == "frames-epic" and len(store.complete_videos()) == 6
    assert {p.name for p in (result.dataset / "videos" / "P01" / "rgb_frames").iterdir()} >= {"P01_01", "P01_02.tar"}
    assert result.checkpoints[4].is_relative_to(tmp_path / "demo" / "runs_frames")
    assert set(result.metrics) == {"1-frame", "4-frame"}
