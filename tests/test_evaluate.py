"""evaluate / submit on a real (tiny) feature set: formats, hand-checked metrics and ensembles, every refusal."""
import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from epicfeat.data.annotations import EpicAnnotations
from epicfeat.evaluate import EvaluateConfig, ScoringError, SubmitConfig, evaluate, submit
from epicfeat.metrics import epic_metrics
from epicfeat.submission import SubmissionError, log_softmax_rows
from epicfeat.temporal.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from epicfeat.temporal.data import Context, pack_split
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.store import open_feature_set
from epicfeat.temporal.train import TrainTemporalConfig, score_split, train_temporal


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extract(dataset, cache, split):
    from epicfeat.extract import ExtractConfig, extract_features

    extract_features(ExtractConfig(split=split, videos=dataset.videos, annotations=dataset.annotations, cache=cache,
                          weights="random", resize=64, crop=56, fps=10.0, precision="fp32", batch_size=32,
                          decode_workers=0, device="cpu", progress=False))


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    """A feature set of every video and two one-epoch models (T=4 and T=8) trained on it."""
    root = tmp_path_factory.mktemp("evaluate")
    cache = root / "cache"
    _extract(synthetic_dataset, cache, "all")
    checkpoints = []
    for frames in (4, 8):
        result = train_temporal(TrainTemporalConfig(
            annotations=synthetic_dataset.annotations, cache=cache, out=root / f"t{frames}", frames=frames,
            hidden=16, epochs=1, batch_size=8, micro_batch_size=8, lr=1e-3, warmup_epochs=0, seed=frames,
            device="cpu", progress=False,
        ))
        checkpoints.append(result.best_checkpoint)
    return synthetic_dataset, cache, checkpoints


def _config(cls, trained, out, **values):
    dataset, cache, checkpoints = trained
    values = {"checkpoints": tuple(checkpoints), "annotations": dataset.annotations, "cache": cache, **values}
    return cls(out=out, device="cpu", progress=False, **values)


def _direct_logits(trained, checkpoint, split, context=Context()):
    """Logits of one checkpoint by a direct model call on the packed split (what evaluate must reproduce)."""
    dataset, cache, _ = trained
    ckpt = load_checkpoint(checkpoint)
    packed = pack_split(open_feature_set(cache, None), EpicAnnotations(dataset.annotations).segments(split),
                        context=context, progress=False)
    model = ckpt.create_model()
    model.compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ckpt.config["precision"]]
    verb, noun = score_split(model, packed, frames=ckpt.config["frames"], batch_size=7, device=torch.device("cpu"))
    return packed, verb.numpy(), noun.numpy()


def _log_softmax(x):
    return torch.log_softmax(torch.from_numpy(x).double(), dim=1).numpy()


def test_evaluate_one_checkpoint_writes_official_files_with_hand_checked_metrics(trained, tmp_path):
    dataset, _, checkpoints = trained
    result = evaluate(_config(EvaluateConfig, trained, tmp_path / "ev", checkpoints=(checkpoints[1],)))
    annotations = EpicAnnotations(dataset.annotations)
    validation = annotations.segments("validation")

    with open(result.results_pickle, "rb") as f:
        results = pickle.load(f)
    assert set(results) == {"verb_output", "noun_output", "narration_id"}
    assert results["verb_output"].dtype == np.float32 and results["noun_output"].dtype == np.float32
    assert results["verb_output"].shape == (len(validation), len(annotations.verbs))
    assert results["noun_output"].shape == (len(validation), len(annotations.nouns))
    assert results["narration_id"].tolist() == validation["narration_id"].tolist()

    packed, verb, noun = _direct_logits(trained, checkpoints[1], "validation")
    np.testing.assert_array_equal(results["verb_output"], log_softmax_rows(verb))  # per-row log-probabilities
    unseen = np.isin(packed.participant_ids, list(annotations.unseen_participants("validation")))
    assert unseen.any() and not unseen.all()  # the tiny dataset has seen and unseen validation participants
    expected = epic_metrics(log_softmax_rows(verb), log_softmax_rows(noun), validation["verb_class"], validation["noun_class"],
                            tail_verbs=annotations.tail_verbs, tail_nouns=annotations.tail_nouns, unseen=unseen)
    saved = json.loads(result.metrics_json.read_text())
    assert saved["segments"] == len(validation) and saved["segments_without_features"] == 0
    assert saved["source"] == "video"  # the form the features were read from (a video, or its official frames)
    assert set(saved["metrics"]) == set(expected) and len(expected) == 12  # 6 all + 3 tail + 3 unseen
    for name, value in expected.items():  # an empty subset is NaN, saved as null
        assert saved["metrics"][name] == (None if np.isnan(value) else pytest.approx(value, abs=1e-4)), name
    # the tiny validation split has no segment of a tail class: only the tail subsets are empty
    assert [name for name, value in saved["metrics"].items() if value is None] == [
        "tail_verb_accuracy_at_1", "tail_noun_accuracy_at_1", "tail_action_accuracy_at_1"]

    rows = result.per_class_csv.read_text().splitlines()
    assert rows[0] == "task,class_id,class_key,segments,accuracy_at_1"
    assert len(rows) == 1 + len(annotations.verbs) + len(annotations.nouns)
    assert sum(int(r.split(",")[3]) for r in rows[1:] if r.startswith("verb,")) == len(validation)
    assert result.plot.stat().st_size > 10_000 and (result.out / "config.yaml").is_file()
    assert f"| {checkpoints[1].parent.name}/best.pt |" in result.metrics_table.read_text()


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_an_ensemble_of_two_checkpoints_equals_the_hand_averaged_scores(trained, tmp_path, mode):
    _, _, checkpoints = trained
    result = evaluate(_config(EvaluateConfig, trained, tmp_path / mode, ensemble_weights=(0.25, 0.75),
                              ensemble_mode=mode))
    _, verb_a, noun_a = _direct_logits(trained, checkpoints[0], "validation")
    _, verb_b, noun_b = _direct_logits(trained, checkpoints[1], "validation")
    if mode == "probs":  # log of the weighted mean of probabilities
        verb = np.log(0.25 * np.exp(_log_softmax(verb_a)) + 0.75 * np.exp(_log_softmax(verb_b)))
        noun = np.log(0.25 * np.exp(_log_softmax(noun_a)) + 0.75 * np.exp(_log_softmax(noun_b)))
    else:  # the weighted mean of logits, stored as per-row log-probabilities
        verb, noun = _log_softmax(0.25 * verb_a + 0.75 * verb_b), _log_softmax(0.25 * noun_a + 0.75 * noun_b)
    with open(result.results_pickle, "rb") as f:
        results = pickle.load(f)
    np.testing.assert_allclose(results["verb_output"], verb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["noun_output"], noun, rtol=1e-5, atol=1e-5)
    saved = json.loads(result.metrics_json.read_text())
    assert [m["weight"] for m in saved["members"]] == [0.25, 0.75]
    assert [m["frames"] for m in saved["members"]] == [4, 8]
    assert "ensemble" in result.metrics_table.read_text()


def _with_head(checkpoint, path, head, frames, context):
    """A checkpoint of ``head`` (random weights) in place of ``checkpoint``'s model: its card and feature statistics,
    ``frames`` rows per segment and ``context`` around them."""
    ckpt = load_checkpoint(checkpoint)
    args = TemporalModelArgs(head=head, input_dim=ckpt.model_args.input_dim, frames=frames, width=16,
                             attention_heads=4, context_seconds=context.seconds, context_frames=context.frames,
                             n_verbs=ckpt.model_args.n_verbs, n_nouns=ckpt.model_args.n_nouns)
    torch.manual_seed(3)
    model = create_temporal_model(args, ckpt.model_state["feature_mean"], ckpt.model_state["feature_std"])
    if model.context_marker is not None:
        torch.nn.init.normal_(model.context_marker)
    card = dataclasses.replace(ckpt.card, config={**ckpt.config, "frames": frames, "head": head,
                                                  "context_seconds": context.seconds,
                                                  "context_frames": context.frames})
    return save_checkpoint(path, model=model, card=card, epoch=1, metrics={}, history=[])


def test_an_ensemble_of_heads_scores_each_member_on_the_rows_and_context_it_was_trained_with(trained, tmp_path):
    """A BiLSTM of T=4 without context, a transformer of T=8 and an attentive probe of T=4 each with its own
    context: each member reads its own pack (its context's rows) at its own K + T + K."""
    _, _, checkpoints = trained
    contexts = {"transformer": Context(1.0, 2), "attentive": Context(0.5, 3)}
    members = [checkpoints[0],
               _with_head(checkpoints[1], tmp_path / "transformer.pt", "transformer", 8, contexts["transformer"]),
               _with_head(checkpoints[0], tmp_path / "attentive.pt", "attentive", 4, contexts["attentive"])]
    result = evaluate(_config(EvaluateConfig, trained, tmp_path / "ev", checkpoints=tuple(members),
                              ensemble_mode="logits"))
    scores = [_direct_logits(trained, members[0], "validation")[1:],
              _direct_logits(trained, members[1], "validation", contexts["transformer"])[1:],
              _direct_logits(trained, members[2], "validation", contexts["attentive"])[1:]]
    verb = _log_softmax(sum(v for v, _ in scores) / 3)
    noun = _log_softmax(sum(n for _, n in scores) / 3)
    with open(result.results_pickle, "rb") as f:
        results = pickle.load(f)
    np.testing.assert_allclose(results["verb_output"], verb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["noun_output"], noun, rtol=1e-5, atol=1e-5)
    # the same K rows from another context's seconds give other scores: the seconds it trained with are what counts
    other = _direct_logits(trained, members[1], "validation", Context(0.3, 2))[1]
    assert np.abs(other - scores[1][0]).max() > 1e-3


def test_compare_runs_tabulates_each_runs_official_metrics_epoch_time_and_parameters(trained, tmp_path):
    from epicfeat.temporal.compare import CompareError, compare_runs, main

    dataset, cache, checkpoints = trained
    lstm = checkpoints[0].parent  # a real train-temporal run folder
    transformer = tmp_path / "runs" / "head_transformer"
    transformer.mkdir(parents=True)
    _with_head(checkpoints[1], transformer / "best.pt", "transformer", 8, Context(1.0, 2))
    shutil.copy(checkpoints[1].parent / "metrics.csv", transformer / "metrics.csv")
    rows = compare_runs([lstm, transformer], annotations=dataset.annotations, cache=cache, out=tmp_path / "cmp",
                        device="cpu")
    assert [r.name for r in rows] == [lstm.name, "head_transformer"]
    assert [r.extra["head"] for r in rows] == ["lstm", "transformer"]
    assert [r.extra["T"] for r in rows] == [4, 8] and [r.extra["context s"] for r in rows] == [0.0, 1.0]
    direct = evaluate(_config(EvaluateConfig, trained, tmp_path / "direct", checkpoints=(transformer / "best.pt",)))
    assert rows[1].metrics["all_action_accuracy_at_1"] == direct.metrics["all_action_accuracy_at_1"]
    model = load_checkpoint(transformer / "best.pt").create_model()
    assert rows[1].extra["parameters"] == sum(p.numel() for p in model.parameters())
    assert all(r.extra["epoch s"] > 0 and r.extra["epochs"] == 1 for r in rows)
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [row["head"] for row in saved] == ["lstm", "transformer"]
    assert saved[1]["metrics"]["all_verb_accuracy_at_5"] == direct.metrics["all_verb_accuracy_at_5"]
    lines = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert lines[2].endswith("| head | T | context s | epoch s | epochs | parameters |")
    assert lines[5].startswith(f"| head_transformer | {direct.metrics['all_verb_accuracy_at_1']:.1f} |")
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    with pytest.raises(CompareError, match="no best.pt"):
        compare_runs([tmp_path], annotations=dataset.annotations, cache=cache, out=tmp_path / "x")
    command = [sys.executable, "-m", "epicfeat.temporal.compare", "--annotations", str(dataset.annotations),
               "--cache", str(cache), "--out", str(tmp_path / "y"), str(tmp_path / "nothing")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no best.pt / metrics.csv; pass train-temporal run folders (--out of each run)"]


def test_submit_writes_the_leaderboard_zip_with_every_test_segment(trained, tmp_path):
    dataset, _, checkpoints = trained
    result = submit(_config(SubmitConfig, trained, tmp_path / "sub"))
    annotations = EpicAnnotations(dataset.annotations)
    test_ids = annotations.segments("test")["narration_id"].tolist()
    with zipfile.ZipFile(result.submission_zip) as archive:
        assert archive.namelist() == ["test.json"]
        submission = json.loads(archive.read("test.json"))
    # random backbone weights: no pretraining (0); full temporal labels (3); trained on the train split (3)
    assert {k: submission[k] for k in ("version", "challenge", "sls_pt", "sls_tl", "sls_td")} == {
        "version": "0.2", "challenge": "action_recognition", "sls_pt": 0, "sls_tl": 3, "sls_td": 3}
    assert list(submission["results"]) == test_ids
    with open(result.results_pickle, "rb") as f:
        results = pickle.load(f)
    first = submission["results"][test_ids[0]]
    assert list(first["verb"]) == [str(c) for c in range(len(annotations.verbs))]
    assert list(first["noun"]) == [str(c) for c in range(len(annotations.nouns))]
    # the JSON decimals read back as exactly the float32 scores of the ensemble
    assert np.array_equal(np.float32(list(first["verb"].values())), results["verb_output"][0])
    assert np.array_equal(np.float32(list(first["noun"].values())), results["noun_output"][0])


def test_submit_reads_train_plus_validation_from_the_checkpoint_and_takes_given_levels(trained, tmp_path):
    _, _, checkpoints = trained
    ckpt = load_checkpoint(checkpoints[0])
    final = tmp_path / "final.pt"
    _resave(ckpt, final, config={**ckpt.config, "train_splits": "train+validation"})
    result = submit(_config(SubmitConfig, trained, tmp_path / "a", checkpoints=(final,)))
    assert result.sls == {"sls_pt": 0, "sls_tl": 3, "sls_td": 4}
    result = submit(_config(SubmitConfig, trained, tmp_path / "b", checkpoints=(final,), sls_pt=1, sls_td=3))
    assert result.sls == {"sls_pt": 1, "sls_tl": 3, "sls_td": 3} and result.sls_sources["sls_pt"] == "given"


def _resave(ckpt, path, model=None, **changes):
    """``ckpt`` saved again at ``path``, with another model or other card fields."""
    card = dataclasses.replace(ckpt.card, **changes)
    return save_checkpoint(path, model=model or ckpt.create_model(), card=card, epoch=ckpt.epoch,
                           metrics=ckpt.metrics, history=ckpt.history)


def test_a_checkpoint_from_another_feature_set_is_refused(trained, tmp_path):
    _, cache, checkpoints = trained
    ckpt = load_checkpoint(checkpoints[0])
    other = _resave(ckpt, tmp_path / "other.pt", feature_set={**ckpt.feature_set, "weights_sha": "0" * 16})
    key = open_feature_set(cache, None).identity.key()
    with pytest.raises(CheckpointError, match="differ in: weights_sha"):  # in an ensemble
        evaluate(_config(EvaluateConfig, trained, tmp_path / "e1", checkpoints=(checkpoints[1], other)))
    with pytest.raises(CheckpointError, match="weights_sha"):  # alone, pointed at this feature set
        submit(_config(SubmitConfig, trained, tmp_path / "e2", checkpoints=(other,), feature_set=key))
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_another_class_table_is_refused(trained, tmp_path):
    dataset, _, checkpoints = trained
    annotations = tmp_path / "annotations"
    shutil.copytree(dataset.annotations, annotations)
    nouns = annotations / "EPIC_100_noun_classes.csv"
    n = len(nouns.read_text().splitlines()) - 1
    nouns.write_text(nouns.read_text().rstrip("\n") + f'\n{n},extra,"[\'extra\']",misc\n')
    config = dataclasses.replace(_config(EvaluateConfig, trained, tmp_path / "ev"), annotations=annotations)
    with pytest.raises(ScoringError, match=rf"noun class table of {n} classes .* \({n + 1} classes\)"):
        evaluate(config)


def test_missing_videos_are_refused_unless_allowed_and_submit_always_refuses(trained, tmp_path):
    dataset, cache, checkpoints = trained
    partial = tmp_path / "cache"
    shutil.copytree(cache, partial)
    store = open_feature_set(partial, None)
    annotations = EpicAnnotations(dataset.annotations)
    gone = {split: annotations.segments(split)["video_id"].iloc[0] for split in ("validation", "test")}
    for video_id in gone.values():
        shutil.rmtree(next(store.path.glob(f"**/{video_id}")))
    with pytest.raises(ScoringError, match=rf"no features.*{gone['validation']}.*--allow-missing"):
        evaluate(_config(EvaluateConfig, trained, tmp_path / "ev", cache=partial))
    result = evaluate(_config(EvaluateConfig, trained, tmp_path / "ev", cache=partial, allow_missing=True))
    lost = int((annotations.segments("validation")["video_id"] == gone["validation"]).sum())
    assert result.dropped == lost and result.segments == len(annotations.segments("validation")) - lost
    with pytest.raises(ScoringError, match=rf"{gone['test']}.*must score every test segment"):
        submit(_config(SubmitConfig, trained, tmp_path / "sub", cache=partial))
    assert not (tmp_path / "sub").exists()


def test_nan_scores_are_refused_and_nothing_is_written(trained, tmp_path):
    _, _, checkpoints = trained
    ckpt = load_checkpoint(checkpoints[0])
    model = ckpt.create_model()
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if name.startswith("verb")).fill_(float("nan"))
    broken = _resave(ckpt, tmp_path / "nan.pt", model=model)
    with pytest.raises(SubmissionError, match="NaN or infinite"):
        submit(_config(SubmitConfig, trained, tmp_path / "sub", checkpoints=(broken,)))
    assert not list((tmp_path / "sub").glob("*.zip")) and not list((tmp_path / "sub").glob("*.pkl"))


def test_cli_evaluates_an_ensemble_and_explains_bad_input(trained, tmp_path):
    dataset, cache, checkpoints = trained
    base = [sys.executable, "-m", "epicfeat", "evaluate", "--annotations", str(dataset.annotations), "--cache",
            str(cache), "--device", "cpu", "--no-progress"]
    out = tmp_path / "cli"
    done = subprocess.run(base + ["--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]),
                                  "--ensemble-weight", "1", "--ensemble-weight", "3", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [m["weight"] for m in json.loads((out / "metrics.json").read_text())["members"]] == [0.25, 0.75]
    bad = subprocess.run(base + ["--checkpoint", str(tmp_path / "absent.pt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "absent.pt does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_members_named_alike_keep_their_own_rows():
    from pathlib import Path

    from epicfeat.evaluate import _member_names

    paths = [Path("runs/a/best.pt"), Path("runs/a/best.pt"), Path("other/b/best.pt")]
    assert _member_names(paths) == ["a/best.pt #1", "a/best.pt #2", "b/best.pt"]


def test_evaluate_scores_in_the_precision_training_validated_in(trained, tmp_path):
    _, _, checkpoints = trained
    best = load_checkpoint(checkpoints[1])
    assert best.config["precision"] in ("fp32", "bf16")  # auto, resolved and recorded by the run
    result = evaluate(_config(EvaluateConfig, trained, tmp_path / "ev", checkpoints=(checkpoints[1],)))
    for name in ("all_verb_accuracy_at_1", "all_noun_accuracy_at_5", "all_action_accuracy_at_1"):
        assert result.metrics[name] == pytest.approx(best.metrics[name], abs=1e-9), name  # training's validation


def test_a_second_evaluate_reads_the_pack_cache_not_zarr_and_scores_identically(trained, tmp_path, monkeypatch):
    from epicfeat.errors import EpicfeatError
    from epicfeat.store import FeatureStore

    cache = tmp_path / "cache"
    shutil.copytree(trained[1], cache)
    shutil.rmtree(cache / ".packed")  # what train-temporal left there: the first evaluate packs from Zarr itself
    first = evaluate(_config(EvaluateConfig, trained, tmp_path / "first", cache=cache))
    packs = sorted(p.name.split("-")[0] for p in (cache / ".packed").glob("*/*") if (p / "index.pt").is_file())
    assert packs == ["validation"]

    # Now the Zarr feature arrays cannot be read: their chunk files are gone and every store read is counted.
    chunk_files = [f for f in cache.glob("*/videos/*/features/c/**/*") if f.is_file()]
    assert chunk_files
    for chunk in chunk_files:
        chunk.unlink()
    reads = []
    original_read = FeatureStore.read
    monkeypatch.setattr(FeatureStore, "read",
                        lambda self, video_id: reads.append(video_id) or original_read(self, video_id))
    second = evaluate(_config(EvaluateConfig, trained, tmp_path / "second", cache=cache))
    assert reads == []
    assert repr(second.metrics) == repr(first.metrics)  # repr: NaN (no tail class in the tiny set) equals itself
    assert (tmp_path / "second/metrics.json").read_text() == (tmp_path / "first/metrics.json").read_text()
    assert second.results_pickle.read_bytes() == first.results_pickle.read_bytes()
    # Without the cache the same evaluate reads every video again and, its chunks gone, gets unusable scores.
    with pytest.raises(EpicfeatError, match="NaN or infinite"):
        evaluate(_config(EvaluateConfig, trained, tmp_path / "third", cache=cache, pack_cache=False))
    assert len(reads) == len(set(EpicAnnotations(trained[0].annotations).segments("validation")["video_id"]))
