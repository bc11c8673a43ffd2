"""``epicfeat demo``: the whole pipeline on the embedded synthetic EPIC-format dataset, on the CPU, in minutes.

    1. generate   a synthetic dataset in the EPIC-100 layout; verbs are told apart only by the order of frames
    2. extract    every video through ResNet50 (seeded random weights) into a Zarr feature set
    3. train      a 1-frame baseline and the seed's 16- and 32-frame BiLSTMs on the cached features
    4. evaluate   each model and the 16+32 ensemble on validation with the official EPIC-100 metrics
    5. submit     the ensemble's test-split submission zip
    6. deploy     predict over one validation video and export the longest model to ONNX

``finetune`` is left out (about one clip per second on a 2-core CPU). Every stage calls the same function as its
CLI command, with smaller settings, and resumes: finished work is reused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from epicfeat.configs import (DemoConfig, EvaluateConfig, ExportConfig, ExtractConfig, PredictConfig, SubmitConfig,
                              TrainTemporalConfig)
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from epicfeat.data.videos import find_videos
from epicfeat.errors import EpicfeatError
from epicfeat.evaluate import TABLE_METRICS, evaluate, submit
from epicfeat.export import export
from epicfeat.extract import extract_features, print_summary
from epicfeat.files import atomic_write_text
from epicfeat.predict import predict
from epicfeat.recipes import save_config
from epicfeat.temporal.train import train_temporal


@dataclass(frozen=True)
class DemoResult:
    dataset: Path
    feature_set: Path
    checkpoints: dict[int, Path]  # frames -> best.pt
    evaluation: Path  # evaluate's folder (metrics.json, metrics.md, per_class.png, results pickle)
    submission: Path
    metrics: dict[str, dict[str, float]]  # model name -> official metrics
    seconds: dict[str, float]  # stage -> wall seconds
    deploy: Path  # predict's timeline and annotated MP4, the ONNX export
    predict_fps: float  # frames per second predict sustained over the whole video
    onnx_max_abs_diff: dict[str, float]  # exported model -> max |onnxruntime - PyTorch| logit


def run_demo(config: DemoConfig) -> DemoResult:
    """Run every stage of the pipeline on synthetic data (see the module docstring); returns where everything is."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    seconds: dict[str, float] = {}
    say = functools.partial(_stage, config.progress, seconds)
    runs = out / ("runs" if config.source == "video" else f"runs_{config.source}")  # models of each form apart

    with say("generate", "1/6 generate the synthetic EPIC-100 dataset"):
        spec = dataclasses.replace(SyntheticSpec.tiny() if config.dataset == "tiny" else SyntheticSpec(),
                                   rgb_frames=config.source == "frames")
        dataset = generate_synthetic_dataset(out / "data", seed=config.seed, spec=spec)
    with say("extract", f"2/6 extract ResNet50 features of every video from its {config.source} (random weights)"):
        feature_set = _extract(config, dataset, out / "cache")
    checkpoints: dict[int, Path] = {}
    for frames in config.frames:
        baseline = " (single-frame baseline)" if frames == 1 else ""
        with say("train", f"3/6 train the {frames}-frame temporal model{baseline}"):
            checkpoints[frames] = _train(config, dataset, feature_set, frames, runs / f"temporal_{frames}f")

    ensemble = [checkpoints[f] for f in config.frames if f > 1]
    evaluations = {f"{f}-frame": [checkpoints[f]] for f in config.frames}
    if len(ensemble) > 1:
        evaluations["ensemble " + "+".join(f"{f}f" for f in config.frames if f > 1)] = ensemble
    common = dict(annotations=dataset.annotations, cache=feature_set.parent, feature_set=feature_set.name,
                  device=config.device)
    with say("evaluate", "4/6 evaluate every model and the ensemble on validation"):
        metrics, evaluation = _evaluate_all(evaluations, runs / "evaluate", common)
    with say("submit", "5/6 write the test-split submission of the ensemble"):
        submission = submit(SubmitConfig(checkpoints=tuple(ensemble or checkpoints.values()),
                                          out=runs / "submit", progress=config.progress, **common))
    deploy = runs / "deploy"
    with say("deploy", "6/6 predict over a validation video and export to ONNX"):
        predicted, exported = _deploy(config, dataset, checkpoints[max(config.frames)], deploy)

    result = DemoResult(dataset=dataset.root, feature_set=feature_set, checkpoints=checkpoints,
                        evaluation=evaluation, submission=submission.submission_zip, metrics=metrics, seconds=seconds,
                        deploy=deploy, predict_fps=predicted.frames_per_second,
                        onnx_max_abs_diff={check.model: check.max_abs_diff for check in exported.checks})
    write_results(result, out / "results.json")
    if config.progress:
        print_demo_summary(result)
    return result


def _extract(config: DemoConfig, dataset, cache: Path) -> Path:
    """Stage one on every synthetic video; the feature set's folder. Stops the demo if any video failed."""
    summary = extract_features(ExtractConfig(
        split="all", videos=dataset.videos, annotations=dataset.annotations, cache=cache,
        weights="random", seed=config.seed, fps=config.fps, resize=config.resize, crop=config.crop,
        precision=config.precision, device=config.device, progress=config.progress, source=config.source,
    ))
    if config.progress:
        print_summary(summary)
    if not summary.ok:
        raise EpicfeatError(f"feature extraction failed for some videos (see above); the demo stops here. "
                            f"Re-run `epicfeat demo` to retry them; finished videos are kept in {summary.store}.")
    return summary.store


def _train(config: DemoConfig, dataset, feature_set: Path, frames: int, run: Path) -> Path:
    """One temporal model on ``frames`` rows per segment (resumed when a killed demo left its run); best.pt."""
    result = train_temporal(TrainTemporalConfig(
        annotations=dataset.annotations, cache=feature_set.parent, feature_set=feature_set.name, out=run,
        resume=(run / "last.pt").is_file(), frames=frames, hidden=config.hidden, epochs=config.epochs,
        batch_size=config.batch_size, micro_batch_size=config.batch_size, lr=config.lr,
        warmup_epochs=config.warmup_epochs, patience=0, seed=config.seed, device=config.device,
        progress=config.progress,
    ))
    return result.best_checkpoint


def _evaluate_all(evaluations: dict[str, list[Path]], out: Path, common: dict) -> tuple[dict, Path]:
    """Validation metrics of every model (name -> checkpoints) and the folder of the last evaluation."""
    metrics: dict[str, dict[str, float]] = {}
    for name, paths in evaluations.items():
        folder = out / name.replace(" ", "_").replace("+", "_")
        metrics[name] = evaluate(EvaluateConfig(checkpoints=tuple(paths), out=folder, progress=False,
                                                **common)).metrics
    return metrics, folder


def _deploy(config: DemoConfig, dataset, checkpoint: Path, deploy: Path):
    """predict over the first validation video (timeline + annotated MP4) and the ONNX export of ``checkpoint``."""
    video_id = EpicAnnotations(dataset.annotations).segments("validation")["video_id"].iloc[0]
    predicted = predict(PredictConfig(
        source=str(find_videos(dataset.videos, [video_id]).found[video_id]), checkpoint=checkpoint, seed=config.seed,
        timeline=deploy / f"{video_id}_timeline.csv", video_out=deploy / f"{video_id}_annotated.mp4",
        device=config.device, progress=False,
    ))
    exported = export(ExportConfig(checkpoint=checkpoint, format="onnx", out=deploy / "onnx", seed=config.seed))
    return predicted, exported


def write_results(result: DemoResult, path: Path) -> Path:
    """``results.json``: every model's validation metrics and the stage times, for scripts (and CI) to check."""
    summary = {
        "metrics": result.metrics,
        "seconds": result.seconds,
        "predict_frames_per_second": result.predict_fps,
        "onnx_max_abs_diff": result.onnx_max_abs_diff,
        "checkpoints": {f"{frames}-frame": str(path) for frames, path in result.checkpoints.items()},
        "submission": str(result.submission),
    }
    return atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def print_demo_summary(result: DemoResult) -> None:
    """The final table: validation metrics of every model, then where every artefact is."""
    console = Console()
    table = Table(title="validation, official EPIC-100 metrics (%), synthetic data")
    table.add_column("model")
    for label, _ in TABLE_METRICS[:6]:
        table.add_column(label, justify="right")
    for name, metrics in result.metrics.items():
        table.add_row(name, *(f"{metrics[key]:.1f}" for _, key in TABLE_METRICS[:6]))
    console.print(table)
    console.print(
        "Chance is about 17% for verbs (6 classes) and 12% for nouns (8 classes). The verbs come in time-reversed "
        "pairs, so a single frame cannot tell them apart and the BiLSTMs must beat the 1-frame model on verbs. "
        "Random backbone weights: on real video use --weights imagenet (see the README)."
    )
    artefacts = Table(title="artefacts", show_header=False)
    artefacts.add_row("dataset", str(result.dataset))
    artefacts.add_row("feature set", str(result.feature_set))
    for frames, path in result.checkpoints.items():
        artefacts.add_row(f"{frames}-frame model", f"{path}  (plots and metrics.csv beside it)")
    artefacts.add_row("evaluation", f"{result.evaluation}  (metrics.json, metrics.md, per_class.png, results_validation.pkl)")
    artefacts.add_row("submission", str(result.submission))
    checks = ", ".join(f"{name} {diff:.1e}" for name, diff in result.onnx_max_abs_diff.items())
    artefacts.add_row("deployment", f"{result.deploy}  (timeline, annotated MP4 at {result.predict_fps:.1f} frames/s; "
                                    f"ONNX max |diff| vs PyTorch: {checks})")
    artefacts.add_row("time", ", ".join(f"{stage} {s:.0f} s" for stage, s in result.seconds.items()))
    console.print(artefacts)


@contextlib.contextmanager
def _stage(enabled: bool, seconds: dict[str, float], key: str, title: str) -> Iterator[None]:
    """Prints the stage's title and adds its wall time to ``seconds[key]``."""
    if enabled:
        Console(stderr=True).rule(f"[bold]{title}")  # progress to stderr, results to stdout
    started = time.perf_counter()
    yield
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
