"""The comparison table (epicfeat.comparison) and the backbone comparison recipe (pipelines/compare_backbones.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epicfeat.comparison import TOP1_COLUMNS, Row, write_comparison

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipelines" / "compare_backbones.py"
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(verb: float, noun: float, action: float) -> dict[str, float]:
    values = {key: float("nan") for _, key in TOP1_COLUMNS}
    values.update(all_verb_accuracy_at_1=verb, all_noun_accuracy_at_1=noun, all_action_accuracy_at_1=action,
                  unseen_verb_accuracy_at_1=verb / 2)
    return values


def test_the_table_holds_every_variant_s_metrics_and_columns(tmp_path, capsys):
    rows = [Row("resnet50", _metrics(40.0, 30.0, 20.0), {"width": 2048, "extract rows/s": 12.345, "cache MB": 3.2}),
            Row("timm:resnet18", _metrics(35.5, 25.0, 10.0), {"width": 512, "extract rows/s": 30.0, "cache MB": 0.8})]
    path = write_comparison(rows, tmp_path, title="backbones", note="random weights")
    lines = path.read_text().splitlines()
    assert lines[2].startswith("| variant | verb@1 | noun@1 | action@1 | tail verb@1")
    assert lines[2].endswith("| width | extract rows/s | cache MB |")
    assert lines[4] == "| resnet50 | 40.0 | 30.0 | 20.0 | n/a | n/a | n/a | 20.0 | n/a | n/a | 2048 | 12.3 | 3.2 |"
    assert lines[5].startswith("| timm:resnet18 | 35.5 | 25.0 | 10.0 |") and lines[-1] == "random weights"
    saved = json.loads((tmp_path / "comparison.json").read_text())  # strict JSON: NaN written as null
    assert saved[1]["width"] == 512 and saved[0]["metrics"]["tail_verb_accuracy_at_1"] is None
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert "| resnet50 | 40.0 |" in capsys.readouterr().out
    assert not any(isinstance(v, float) and math.isnan(v) for v in saved[0]["metrics"].values())


def test_a_cost_column_is_charted_beside_the_accuracies_and_small_numbers_keep_two_decimals(tmp_path):
    rows = [Row("lstm", _metrics(40.0, 30.0, 20.0), {"epoch s": 0.05}), Row("mean", _metrics(30.0, 20.0, 10.0),
                                                                              {"epoch s": 0.02})]
    plain = (write_comparison(rows, tmp_path / "plain", title="heads").parent / "comparison.png").read_bytes()
    costly = write_comparison(rows, tmp_path / "cost", title="heads", cost="epoch s")
    assert costly.read_text().splitlines()[4].endswith("| 0.05 |")
    width = int.from_bytes((costly.parent / "comparison.png").read_bytes()[16:20], "big")  # PNG header: IHDR width
    assert width == int.from_bytes(plain[16:20], "big") + 3 * 120  # 3 inches more at 120 dpi


def test_the_recipe_answers_bad_input_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(RECIPE), "--backbones", "timm:resnet181", "--annotations", tmp_path,
                           "--videos", tmp_path, "--out", tmp_path / "out"], capture_output=True, text=True,
                          env=CHILD_ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "close matches" in done.stderr and "timm:resnet18" in done.stderr


@pytest.mark.slow
def test_the_recipe_compares_two_backbones_on_tiny_synthetic_data(synthetic_dataset, tmp_path):
    done = subprocess.run(
        [sys.executable, str(RECIPE), "--annotations", synthetic_dataset.annotations, "--videos",
         synthetic_dataset.videos, "--weights", "random", "--backbones", "resnet50,timm:vit_tiny_patch16_224",
         "--extract", "crop=32", "--extract", "progress=false", "--extract", "decode_workers=0",
         "--train", "frames=2", "--train", "hidden=8", "--train", "epochs=1", "--train", "batch_size=8",
         "--train", "micro_batch_size=8", "--train", "progress=false", "--cache", tmp_path / "cache",
         "--out", tmp_path / "out"], capture_output=True, text=True, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = {r["variant"]: r for r in json.loads((tmp_path / "out" / "comparison.json").read_text())}
    assert saved["resnet50"]["width"] == 2048 and saved["timm:vit_tiny_patch16_224"]["width"] == 192
    assert all(r["extract rows/s"] > 0 and r["cache MB"] > 0 for r in saved.values())
    assert 0 <= saved["resnet50"]["metrics"]["all_verb_accuracy_at_1"] <= 100
    assert "seeded random weights" in (tmp_path / "out" / "comparison.md").read_text()
