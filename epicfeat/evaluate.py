"""``epicfeat evaluate`` and ``epicfeat submit``: score a split from the feature cache with one or more checkpoints.

    evaluate(config)                        validation (or train) split -> official metrics, results pickle, plots
    submit(config)                          test split -> the leaderboard's submission zip (+ results pickle)
      _load_members(config, annotations)    checkpoints, checked against the class tables
      _score(config, members, split)        pack the split once per context, score every checkpoint at its own T
                                            and context, ensemble

Each checkpoint is scored in the precision its training validated in (``--precision`` overrides it), on the rows
it was trained to read (its T, and the context around each segment when it had one). The files
hold per-row log-probabilities and the metrics are computed on exactly those values. Every file is written
atomically: a refusal leaves no half-written file.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from epicfeat.configs import EvaluateConfig, ScoringConfig, SubmitConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.devices import PRECISION_DTYPES, resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text
from epicfeat.metrics import epic_metrics, most_confused, per_class_accuracy
from epicfeat.recipes import save_config
from epicfeat.store import open_feature_set
from epicfeat.submission import build_submission, ensemble, log_softmax_rows, write_results_pickle, write_submission_zip
from epicfeat.temporal.checkpoint import check_feature_set, load_checkpoint
from epicfeat.temporal.data import packed_split
from epicfeat.temporal.precision import recorded_precision
from epicfeat.temporal.train import score_split

# The metrics the summary table shows (all are in metrics.json), in the leaderboard's order.
TABLE_METRICS = (
    ("verb@1", "all_verb_accuracy_at_1"),
    ("noun@1", "all_noun_accuracy_at_1"),
    ("action@1", "all_action_accuracy_at_1"),
    ("verb@5", "all_verb_accuracy_at_5"),
    ("noun@5", "all_noun_accuracy_at_5"),
    ("action@5", "all_action_accuracy_at_5"),
    ("tail action@1", "tail_action_accuracy_at_1"),
    ("unseen action@1", "unseen_action_accuracy_at_1"),
)

# Supervision levels (https://github.com/epic-kitchens/SLS) that are true for models this tool trains.
SLS_TD = {"train": 3, "train+validation": 4}  # the full train split / train and validation
SLS_PT_OF_WEIGHTS = {"random": 0, "imagenet1k_v1": 1, "imagenet1k_v2": 1}  # 0 none, 1 public image dataset


class ScoringError(EpicfeatError):
    """A split that cannot be scored as asked; nothing was written. The message says what to do."""


@dataclass(frozen=True)
class Scores:
    """One split scored by every member and by their combination (rows aligned with ``narration_ids``)."""

    narration_ids: list[str]
    members: list[tuple[str, np.ndarray, np.ndarray]]  # (name, verb (N, Cv), noun (N, Cn)) per checkpoint
    verb: np.ndarray  # (N, Cv) combined: logits of a single model, ensemble log-probabilities or mean logits
    noun: np.ndarray  # (N, Cn)
    weights: list[float]  # normalised ensemble weights
    feature_set_key: str
    source: str  # the feature set's source form: video, or official frames (frames-epic, ...)
    split_segments: int  # segments in the split's CSV
    dropped: int  # of them, segments whose video is not in the feature set
    missing_video_ids: tuple[str, ...]
    packed: Any  # the PackedSplit (labels, participants) the rows come from


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    metrics: dict[str, float]  # the combined model's official metrics (percent; NaN for an empty subset)
    member_metrics: dict[str, dict[str, float]]  # per checkpoint
    results_pickle: Path
    metrics_json: Path
    metrics_table: Path
    per_class_csv: Path
    plot: Path
    segments: int
    dropped: int


@dataclass(frozen=True)
class SubmitResult:
    out: Path
    submission_zip: Path
    results_pickle: Path
    segments: int
    sls: dict[str, int]
    sls_sources: dict[str, str]


# --------------------------------------------------------------------------------------------- entry points
def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """``epicfeat evaluate``: official EPIC-100 metrics of one checkpoint or an ensemble on a labelled split."""
    annotations = _annotations(config)
    members = _load_members(config, annotations)
    scores = _score(config, members, annotations, config.split)
    if scores.dropped and not config.allow_missing:
        raise ScoringError(
            f"{scores.dropped} of the {scores.split_segments} {config.split} segments have no features: their "
            f"{len(scores.missing_video_ids)} video(s) are not (completely) in feature set {scores.feature_set_key} "
            f"({_listed(scores.missing_video_ids)}). Extract them with the feature set's settings (epicfeat extract "
            f"--split {config.split} ...), or pass --allow-missing to score the rest (metrics then cover a subset)."
        )
    verb_labels, noun_labels = scores.packed.verb_labels.numpy(), scores.packed.noun_labels.numpy()  # (N,), (N,)
    metrics_of = _official_metrics(annotations, verb_labels, noun_labels, _unseen_mask(config.split, annotations,
                                                                                       scores.packed))
    member_metrics = {name: metrics_of(verb, noun) for name, verb, noun in scores.members}
    combined = metrics_of(scores.verb, scores.noun)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    results_pickle = write_results_pickle(out / f"results_{config.split}.pkl", scores.verb, scores.noun,
                                          scores.narration_ids)
    rows = dict(member_metrics) if len(members) == 1 else {**member_metrics, "ensemble": combined}
    metrics_json, metrics_table = _write_metric_files(config, members, scores, member_metrics, combined, rows)
    per_class_csv, plot = _class_diagnostics(scores, annotations, verb_labels, noun_labels, out, config.top_confused)
    result = EvaluateResult(
        out=out, metrics=combined, member_metrics=member_metrics, results_pickle=results_pickle,
        metrics_json=metrics_json, metrics_table=metrics_table, per_class_csv=per_class_csv, plot=plot,
        segments=len(scores.narration_ids), dropped=scores.dropped,
    )
    if config.progress:
        _print_table(rows, title=f"{config.split} ({len(scores.narration_ids)} segments read from {scores.source}, "
                                 "official EPIC-100 metrics, %)")
        print(f"wrote {metrics_json}, {metrics_table}, {results_pickle}, {per_class_csv}, {plot}")
    return result


def _unseen_mask(split: str, annotations, packed) -> np.ndarray | None:
    """(N,) bool: segments of participants absent from training (validation only; None when unknown)."""
    participants = annotations.unseen_participants("validation") if split == "validation" else None
    if participants is None:
        return None
    return np.isin(np.asarray(packed.participant_ids), list(participants))


def _official_metrics(annotations, verb_labels: np.ndarray, noun_labels: np.ndarray, unseen: np.ndarray | None):
    """A function (verb, noun) -> the official metrics of those scores, with the split's tail and unseen subsets."""
    def metrics_of(verb: np.ndarray, noun: np.ndarray) -> dict[str, float]:
        # Scored as written: the results pickle holds log_softmax_rows of the same arrays, bit for bit.
        verb, noun = log_softmax_rows(verb), log_softmax_rows(noun)  # (N, Cv), (N, Cn)
        values = epic_metrics(verb, noun, verb_labels, noun_labels, tail_verbs=annotations.tail_verbs,
                              tail_nouns=annotations.tail_nouns, unseen=unseen)
        return {name: float(value) for name, value in values.items()}

    return metrics_of


def _write_metric_files(config: EvaluateConfig, members, scores: Scores, member_metrics, combined,
                        rows: dict[str, dict[str, float]]) -> tuple[Path, Path]:
    """metrics.json (every metric of every member and of the combination) and metrics.md (the summary table)."""
    report = {
        "split": config.split,
        "segments": len(scores.narration_ids),
        "segments_in_split": scores.split_segments,
        "segments_without_features": scores.dropped,
        "feature_set": scores.feature_set_key,
        "source": scores.source,
        "ensemble_mode": config.ensemble_mode if len(members) > 1 else "single model (logits)",
        "members": [
            {"checkpoint": str(path), "frames": _frames(ckpt), "weight": weight, "metrics": _json_safe(member_metrics[name])}
            for (path, ckpt), weight, (name, _, _) in zip(members, scores.weights, scores.members)
        ],
        "metrics": _json_safe(combined),
    }
    metrics_json, metrics_table = Path(config.out) / "metrics.json", Path(config.out) / "metrics.md"
    atomic_write_text(metrics_json, json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(metrics_table, _markdown_table(rows, title=f"{config.split}: {len(scores.narration_ids)} segments"))
    return metrics_json, metrics_table


def submit(config: SubmitConfig) -> SubmitResult:
    """``epicfeat submit``: score the test split and write the leaderboard's submission zip."""
    annotations = _annotations(config)
    members = _load_members(config, annotations)
    sls, sources = _supervision_levels(config, [ckpt for _, ckpt in members])
    scores = _score(config, members, annotations, "test")
    if scores.dropped:
        raise ScoringError(
            f"{scores.dropped} of the {scores.split_segments} test segments have no features: their "
            f"{len(scores.missing_video_ids)} video(s) are not (completely) in feature set {scores.feature_set_key} "
            f"({_listed(scores.missing_video_ids)}). A submission must score every test segment: extract them "
            "with the feature set's settings (epicfeat extract --split test ...); nothing was written."
        )
    expected = annotations.segments("test")["narration_id"].astype(str).tolist()
    submission = build_submission(
        scores.verb, scores.noun, scores.narration_ids, expected_ids=expected,
        n_verbs=len(annotations.verbs), n_nouns=len(annotations.nouns), sls=sls,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    results_pickle = write_results_pickle(out / "results_test.pkl", scores.verb, scores.noun, scores.narration_ids)
    submission_zip = write_submission_zip(out / "submission.zip", submission)
    result = SubmitResult(out=out, submission_zip=submission_zip, results_pickle=results_pickle,
                          segments=len(expected), sls=sls, sls_sources=sources)
    if config.progress:
        levels = ", ".join(f"{name}={value} ({sources[name]})" for name, value in sls.items())
        print(f"scored {len(expected)} test segments with {len(members)} checkpoint(s); supervision levels: {levels}")
        print(f"wrote {submission_zip} (upload this) and {results_pickle}")
    return result


# ------------------------------------------------------------------------------------------------- scoring
def _annotations(config: ScoringConfig):
    if config.annotations is None:
        raise ScoringError("no annotations given: pass --annotations DIR (the folder holding EPIC_100_*.csv)")
    return EpicAnnotations(config.annotations)


def _load_members(config: ScoringConfig, annotations) -> list[tuple[Path, Any]]:
    """The checkpoints, refused when their class tables differ from the annotations'."""
    if not config.checkpoints:
        raise ScoringError("no checkpoint given: pass --checkpoint runs/temporal_16f/best.pt (repeat the option "
                           "to ensemble several models)")
    members = [(Path(path), load_checkpoint(path)) for path in config.checkpoints]
    for path, ckpt in members:
        for task, table in (("verb", annotations.verbs), ("noun", annotations.nouns)):
            trained = getattr(ckpt, f"{task}_classes")
            if tuple(trained) != tuple(table.keys):
                raise ScoringError(
                    f"checkpoint {path} was trained with a {task} class table of {len(trained)} classes that differs "
                    f"from the one in {config.annotations} ({len(table)} classes): its scores would name the wrong "
                    "classes. Use the annotations the model was trained with, or a model trained on these."
                )
    return members


def _score(config: ScoringConfig, members: list[tuple[Path, Any]], annotations, split: str) -> Scores:
    first = members[0][1]
    store = open_feature_set(Path(config.cache), config.feature_set or first.feature_set_key)
    for _, ckpt in members:
        check_feature_set(ckpt, store.identity)  # so an ensemble's members all read the same features
    segments = annotations.segments(split)
    # One pack per context's seconds (the rows around the segments differ); they hold the same segments.
    contexts = {ckpt.model_args.context.seconds: ckpt.model_args.context for _, ckpt in members}
    packs = {seconds: packed_split(store, segments, split, cache=config.pack_cache, progress=config.progress,
                                   context=context) for seconds, context in contexts.items()}
    packed = packs[first.model_args.context.seconds]
    if len(packed) == 0:
        raise ScoringError(
            f"none of the {len(segments)} {split} segments has features in feature set {store.path}: extract their "
            f"videos first (epicfeat extract --split {split} ... with the feature set's settings)"
        )
    device = resolve_device(config.device)
    scored = []
    for name, (_, ckpt) in zip(_member_names([path for path, _ in members]), members):
        model = ckpt.create_model(device)
        model.compute_dtype = PRECISION_DTYPES[_precision(config, ckpt)]
        context = ckpt.model_args.context  # its seconds' pack, sampled with its K
        rows = dataclasses.replace(packs[context.seconds], context=context)
        verb, noun = score_split(model, rows, frames=_frames(ckpt), batch_size=config.batch_size, device=device)
        scored.append((name, verb.cpu().numpy(), noun.cpu().numpy()))  # (N, Cv), (N, Cn)
    weights = np.ones(len(members)) if config.ensemble_weights is None else np.asarray(config.ensemble_weights)
    if len(scored) == 1:
        verb, noun = scored[0][1], scored[0][2]
    else:
        verb, noun = ensemble([(v, n) for _, v, n in scored], weights, mode=config.ensemble_mode)
    return Scores(
        narration_ids=list(packed.narration_ids), members=scored, verb=verb, noun=noun,
        weights=(weights / weights.sum()).tolist(), feature_set_key=store.identity.key(), source=store.identity.source,
        split_segments=len(segments), dropped=len(segments) - len(packed),
        missing_video_ids=tuple(packed.missing_video_ids), packed=packed,
    )


def _frames(checkpoint) -> int:
    return int(checkpoint.config["frames"])


def _precision(config: ScoringConfig, checkpoint) -> str:
    """The precision a member is scored in: given, or the one its training validated in (its recorded config)."""
    return recorded_precision(checkpoint) if config.precision == "checkpoint" else config.precision


def _member_names(paths: list[Path]) -> list[str]:
    """runs/temporal_32f/best.pt -> temporal_32f/best.pt; a name that repeats gets its position (#2)."""
    names = [f"{path.parent.name}/{path.name}" if path.parent.name else path.name for path in paths]
    return [f"{name} #{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _supervision_levels(config: SubmitConfig, checkpoints: list) -> tuple[dict[str, int], dict[str, str]]:
    """The sls_pt / sls_tl / sls_td of the submission, and where each came from (given, or read from the models)."""
    sls, sources = {}, {}
    if config.sls_pt is not None:
        sls["sls_pt"], sources["sls_pt"] = config.sls_pt, "given"
    else:
        weights = {ckpt.feature_set["weights"] for ckpt in checkpoints}
        levels = {SLS_PT_OF_WEIGHTS.get("random" if w.startswith("random") else w) for w in weights}
        if None in levels or len(levels) != 1:
            raise ScoringError(
                f"cannot tell the pretraining level (sls_pt) of backbone weights {sorted(weights)}: pass --sls-pt "
                "(0 none, 1 public image dataset such as ImageNet, 2 public image and video datasets, 3-4 "
                "self-supervised, 5 private data; a backbone fine-tuned from ImageNet on EPIC-100 is 1)"
            )
        sls["sls_pt"], sources["sls_pt"] = levels.pop(), f"backbone weights {', '.join(sorted(weights))}"
    sls["sls_tl"], sources["sls_tl"] = config.sls_tl, "full temporal supervision" if config.sls_tl == 3 else "given"
    if config.sls_td is not None:
        sls["sls_td"], sources["sls_td"] = config.sls_td, "given"
    else:
        trained_on = {(ckpt.config["train_splits"], ckpt.config["train_file"]) for ckpt in checkpoints}
        if any(train_file != "EPIC_100_train.csv" for _, train_file in trained_on):
            raise ScoringError(
                "a checkpoint was trained on a train file other than EPIC_100_train.csv, so the training-data level "
                "(sls_td) is not 3 or 4 by definition: pass --sls-td (see --help)"
            )
        sls["sls_td"] = max(SLS_TD[splits] for splits, _ in trained_on)
        sources["sls_td"] = "checkpoints trained on " + " and ".join(sorted({s for s, _ in trained_on}))
    return sls, sources


# ---------------------------------------------------------------------------------------------- reporting
def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN (a subset without segments, e.g. no unseen participant) becomes null: JSON has no NaN."""
    return {name: (None if math.isnan(value) else round(value, 4)) for name, value in metrics.items()}


def _listed(ids: tuple[str, ...] | list[str], shown: int = 8) -> str:
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _markdown_table(rows: dict[str, dict[str, float]], *, title: str) -> str:
    header = "| model | " + " | ".join(label for label, _ in TABLE_METRICS) + " |"
    lines = [f"# {title} (official EPIC-100 metrics, %)", "", header,
             "|" + "---|" * (len(TABLE_METRICS) + 1)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics, key) for _, key in TABLE_METRICS) + " |")
    return "\n".join(lines) + "\n"


def _print_table(rows: dict[str, dict[str, float]], *, title: str) -> None:
    table = Table(title=title)
    table.add_column("model")
    for label, _ in TABLE_METRICS:
        table.add_column(label, justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *(_cell(metrics, key) for _, key in TABLE_METRICS))
    console = Console()
    Console(width=max(console.width, 130)).print(table)  # 9 columns: never truncate a metric's name


def _class_diagnostics(scores: Scores, annotations, verb_labels: np.ndarray, noun_labels: np.ndarray,
                       out: Path, top: int) -> tuple[Path, Path]:
    """per_class.csv (top-1 accuracy of every class) and per_class.png (accuracy of the most frequent classes
    and the most confused pairs, for verbs and nouns)."""
    tasks = []
    for task, logits, labels, table in (("verb", scores.verb, verb_labels, annotations.verbs),
                                        ("noun", scores.noun, noun_labels, annotations.nouns)):
        accuracy = per_class_accuracy(logits, labels, len(table))  # (C,) NaN for absent classes
        counts = np.bincount(labels, minlength=len(table))  # (C,)
        confused = most_confused(logits, labels, table.keys, top=top)
        tasks.append((task, table.keys, accuracy, counts, confused))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "class_id", "class_key", "segments", "accuracy_at_1"])
    for task, keys, accuracy, counts, _ in tasks:
        for class_id, key in enumerate(keys):
            writer.writerow([task, class_id, key, int(counts[class_id]),
                             "" if np.isnan(accuracy[class_id]) else f"{accuracy[class_id]:.2f}"])
    per_class_csv = out / "per_class.csv"
    atomic_write_text(per_class_csv, buffer.getvalue())

    fig = Figure(figsize=(14, 9))
    FigureCanvasAgg(fig)  # its own Agg canvas: no pyplot state, nothing to close
    axes = fig.subplots(2, 2)
    for row, (task, keys, accuracy, counts, confused) in enumerate(tasks):
        frequent = [c for c in np.argsort(-counts, kind="stable")[:20] if counts[c] > 0]
        ax = axes[row, 0]
        ax.bar(range(len(frequent)), [accuracy[c] for c in frequent], color="tab:blue")
        ax.set_xticks(range(len(frequent)), [f"{keys[c]} ({counts[c]})" for c in frequent], rotation=60,
                      ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{task}: the {len(frequent)} most frequent classes (segments)")
        ax = axes[row, 1]
        labels = [f"{true} -> {predicted}" for true, predicted, _ in confused][::-1]
        ax.barh(range(len(confused)), [count for _, _, count in confused][::-1], color="tab:red")
        ax.set_yticks(range(len(confused)), labels, fontsize=8)
        ax.set_xlabel("segments")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.25-segment ticks
        ax.set_title(f"{task}: most confused (true -> predicted)")
    fig.tight_layout()
    plot = out / "per_class.png"
    tmp = out / ".per_class.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(plot)
    return per_class_csv, plot
