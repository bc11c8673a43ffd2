"""train-temporal --head and --context-seconds end to end (needs the train.py change of issue 23's report)."""
import subprocess
import sys

import pytest
import torch

from epicfeat.temporal.checkpoint import load_checkpoint
from epicfeat.temporal.data import Context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_temporal_records_the_head_and_context_and_evaluate_scores_them(synthetic_dataset, tmp_path):
    from epicfeat.extract import ExtractConfig, extract_features

    cache = tmp_path / "cache"
    extract_features(ExtractConfig(split="all", videos=synthetic_dataset.videos, annotations=synthetic_dataset.annotations,
                                   cache=cache, weights="random", resize=64, crop=56, fps=10.0, precision="fp32",
                                   batch_size=32, decode_workers=0, device="cpu", progress=False))
    run = tmp_path / "run"
    command = ["epicfeat", "train-temporal", "--annotations", str(synthetic_dataset.annotations), "--cache",
               str(cache), "--out", str(run), "--head", "transformer", "--width", "16", "--attention-heads", "4",
               "--frames", "4", "--context-seconds", "0.5", "--context-frames", "2", "--cutmix-alpha", "1",
               "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "4", "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    best = load_checkpoint(run / "best.pt")
    assert best.model_args.head == "transformer" and best.model_args.context == Context(0.5, 2)
    assert best.model_args.width == 16 and best.sequence_length == 2 + 4 + 2
    assert best.config["head"] == "transformer" and best.config["context_seconds"] == 0.5
    evaluated = subprocess.run(["epicfeat", "evaluate", "--annotations", str(synthetic_dataset.annotations),
                                "--cache", str(cache), "--checkpoint", str(run / "best.pt"), "--out",
                                str(tmp_path / "ev"), "--device", "cpu", "--no-progress"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    resumed = subprocess.run(command + ["--head", "attentive", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 2 and "head" in resumed.stderr  # another head is another run
    bad = subprocess.run(command[:2] + ["--head", "transformer", "--width", "10", "--attention-heads", "4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "attention_heads (4) must divide width (10)" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("head", ["transformer", "attentive"])
def test_resume_of_an_attention_head_is_bit_identical_to_an_uninterrupted_run(tmp_path, head):
    from test_train_temporal import _config, _data, killed_after_epoch

    from epicfeat.temporal.train import fit

    data = _data(60, 30)
    # Accumulation, dropout (inside the attention blocks too) and CutMix on: every RNG stream must come back.
    settings = dict(head=head, width=16, attention_heads=4, attention_dropout=0.2, epochs=3, batch_size=16,
                    micro_batch_size=8, dropout=0.5, cutmix_alpha=1.0, deterministic=True, precision="bf16")
    straight = fit(_config(tmp_path, "straight", **settings), data)
    with killed_after_epoch(1):
        fit(_config(tmp_path, "resumed", **settings), data)
    resumed = fit(_config(tmp_path, "resumed", resume=True, **settings), data)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a.model_args.head == head and a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in straight.history]
