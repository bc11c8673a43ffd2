"""Stage-two runs side by side: the heads comparison (``pipelines/compare_heads.sh``), or any set of runs on one
feature set (backbones, T, context...).

    compare_runs(runs, ...)    train-temporal run folders -> evaluate each best.pt -> one table (epicfeat.comparison:
                               top-1, tail, unseen, head, T, context, epoch seconds, parameters), comparison.md /
                               comparison.json / comparison.png
    time_heads(train, ...)     epoch time and the model's share of it per head on one packed split (bench_temporal)

    python -m epicfeat.temporal.compare --annotations DIR --cache DIR --out DIR RUN [RUN ...]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from epicfeat.comparison import Row, write_comparison
from epicfeat.configs import EvaluateConfig, TrainTemporalConfig
from epicfeat.devices import PRECISION_DTYPES
from epicfeat.errors import EpicfeatError
from epicfeat.temporal.checkpoint import load_checkpoint
from epicfeat.temporal.data import PackedSplit, feature_stats
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model


class CompareError(EpicfeatError):
    """A run folder that cannot be compared (no best.pt, no metrics.csv)."""


# ------------------------------------------------------------------------------------------------- the table
def compare_runs(runs: Sequence[Path], *, annotations: Path, cache: Path, out: Path, device: str = "auto") -> list[Row]:
    """Evaluate each run's best.pt on validation (``evaluate``, into ``out/<run name>``) and tabulate: a row per run
    with the official metrics (every one, top-5 too, in comparison.json), its head, T, context seconds, the median
    epoch seconds of its metrics.csv and its parameters. Writes comparison.md/.json/.png into ``out``; returns the
    rows."""
    from epicfeat.evaluate import evaluate  # evaluate imports the temporal package: imported when called

    rows = []
    for run in map(Path, runs):
        best, log = run / "best.pt", run / "metrics.csv"
        if not best.is_file() or not log.is_file():
            raise CompareError(f"{run}: no best.pt / metrics.csv; pass train-temporal run folders (--out of each run)")
        scored = evaluate(EvaluateConfig(checkpoints=(best,), annotations=annotations, cache=cache, out=out / run.name,
                                         device=device, progress=False))
        checkpoint = load_checkpoint(best)
        epochs = pd.read_csv(log)
        rows.append(Row(run.name, scored.metrics, {
            "head": checkpoint.model_args.head, "T": checkpoint.window,
            "context s": checkpoint.model_args.context.seconds,
            "epoch s": statistics.median(epochs["epoch_seconds"]), "epochs": len(epochs),
            "parameters": sum(t.numel() for name, t in checkpoint.model_state.items()
                              if name not in ("feature_mean", "feature_std"))}))
    write_comparison(rows, out, title="stage-two runs compared (validation)", cost="epoch s")
    return rows


# ------------------------------------------------------------------------------------------ per-head timings
def time_heads(train: PackedSplit, *, heads: Sequence[str], frames: int, batch_size: int, device: torch.device,
               precision: str = "fp32", classes: tuple[int, int] = (97, 300), **sizes) -> list[dict]:
    """Per head: one epoch of train-temporal's loop (``train_one_epoch``) on ``train`` against the model alone (its
    forward, backward and AdamW on one pre-gathered batch, as many steps as the epoch has), parameters; each head
    as train-temporal builds it from its defaults, ``classes`` (verbs, nouns) and ``sizes`` (TrainTemporalConfig
    fields: width, depth, ...).
    The split's context (if any) is the heads'. For bench_temporal: the heads side by side in one run."""
    from epicfeat.temporal.train import StepSettings, train_one_epoch  # train imports this package's neighbours
    from epicfeat.training import EarlyStopping, LRSchedule, TrainingState

    steps = math.ceil(len(train) / batch_size)
    settings = StepSettings(frames=frames, batch_size=batch_size, micro_batch_size=batch_size)
    results = []
    for head in heads:
        config = TrainTemporalConfig(head=head, frames=frames, context_seconds=train.context.seconds,
                                     context_frames=max(train.context.frames, 1), **sizes)
        torch.manual_seed(0)
        model = create_temporal_model(TemporalModelArgs.of_config(config, input_dim=train.features.shape[1],
                                                                  n_verbs=classes[0], n_nouns=classes[1]),
                                      *feature_stats(train)).to(device)
        model.compute_dtype = PRECISION_DTYPES[precision]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        state = TrainingState(optimizer, LRSchedule(peak=1e-4, warmup_steps=0, total_steps=2 * steps),
                              EarlyStopping(patience=0, validated=False),
                              torch.Generator(device=train.device).manual_seed(0))
        train_one_epoch(model, train, state, settings)  # warm-up: kernels chosen, the allocator filled
        epoch = _timed(device, train_one_epoch, model, train, state, settings)
        batch = train.gather(torch.arange(min(batch_size, len(train)), device=train.device), frames,
                             train=False).to(device)  # (B, L, D)
        labels = torch.zeros(len(batch), dtype=torch.int64, device=device)  # (B,)

        def model_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            verbs, nouns = model(batch)
            (torch.nn.functional.cross_entropy(verbs, labels) + torch.nn.functional.cross_entropy(nouns, labels)
             ).backward()
            optimizer.step()

        model_step()
        alone = _timed(device, lambda: [model_step() for _ in range(steps)])
        results.append({"head": head, "parameters": sum(p.numel() for p in model.parameters()), "epoch_s": epoch,
                        "model_s": alone, "model_share": alone / epoch, "steps": steps, "segments": len(train),
                        "rows": batch.shape[1], "precision": precision})
    return results


def _timed(device: torch.device, fn, *args) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epicfeat.temporal.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train-temporal run folders (each holds best.pt)")
    parser.add_argument("--annotations", type=Path, required=True, help="folder with EPIC_100_*.csv")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="folder of feature sets")
    parser.add_argument("--out", type=Path, required=True, help="folder for comparison.md/.json/.png and evaluations")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        compare_runs(args.runs, annotations=args.annotations, cache=args.cache, out=args.out, device=args.device)
    except EpicfeatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
