"""The command line as a user meets it: the installed ``epicfeat`` console script, run in a real process.

Every option's help and default come from its config dataclass; every user mistake is one line and exit 2, never a
traceback; Ctrl-C keeps finished work and says how to resume (exit 130); an installed wheel works outside the
checkout.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from epicfeat import configs
from epicfeat.cli._options import help_text

REPO = Path(__file__).resolve().parent.parent
EPICFEAT = shutil.which("epicfeat") or pytest.fail("the epicfeat console script is not installed (pip install -e .)")

COMMANDS = {
    "extract": configs.ExtractConfig,
    "train-temporal": configs.TrainTemporalConfig,
    "evaluate": configs.EvaluateConfig,
    "submit": configs.SubmitConfig,
    "finetune": configs.FinetuneConfig,
    "predict": configs.PredictConfig,
    "export": configs.ExportConfig,
    "demo": configs.DemoConfig,
    "cache info": configs.CacheConfig,
    "cache verify": configs.CacheConfig,
    "cache export": configs.CacheExportConfig,
}


def epicfeat(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    return subprocess.run([EPICFEAT, *args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def one_line(text: str) -> str:
    return " ".join(text.split())  # help is wrapped to the terminal: compare it unwrapped


def no_space(text: str) -> str:
    return "".join(text.split())  # click also wraps after hyphens ("channels-" / "last")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_option_with_its_dataclass_default(command):
    result = epicfeat(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    shown = no_space(result.stdout)
    for field in dataclasses.fields(COMMANDS[command]):
        if not field.metadata.get("cli", True):
            continue
        text = no_space(help_text(field))
        assert text and text in shown, f"{command} --help lacks the help of {field.name}: {text!r}"
        if "(default:" in text:  # shown once, by this option alone
            assert shown.count(text) == 1
    assert "[default:" not in result.stdout  # one notation only (typer's own "[default: x]" is switched off)


def test_help_lists_choices_and_the_recipe_option():
    shown = one_line(epicfeat("extract", "--help").stdout)
    assert "--split [train|validation|test|all]" in shown or "--split <train|validation|test|all>" in shown
    assert "--config FILE" in shown
    assert "(default: 10)" in shown  # --fps, the example of a default that vanished


USAGE_ERRORS = [
    (["train-temporal", "--epochs", "abc"], "'--epochs'"),
    (["extract", "--bogus"], "--bogus"),
    (["train-temporal", "--epoch", "3"], "--epochs"),  # a typo gets the close matches
    (["extract", "--split", "trian"], "'--split'"),
    (["export", "--format", "onnxx"], "'--format'"),
    (["predict"], "'source'"),  # missing argument
    (["finetune", "--crop-scale", "0.5"], "--crop-scale"),
    (["train-temporal", "--config", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml"),
    (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "annotations"),
    (["cache", "export"], "--out"),
    (["extract", "--fps", "0"], "fps must be > 0"),  # before any video is opened, not a failure per video
    (["extract", "--batch-size", "0"], "batch_size must be >= 1"),
    (["no-such-command"], "no-such-command"),
]


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_user_mistakes_are_one_clear_line_and_exit_2(args, named):
    result = epicfeat(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and named.lower() in first.lower(), first


def test_a_recipe_with_an_unknown_key_names_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("frames: 32\nlearning_rate: 0.1\n")
    result = epicfeat("train-temporal", "--config", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key 'learning_rate'" in result.stderr.splitlines()[0]


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory, synthetic_dataset):
    cache = tmp_path_factory.mktemp("cli_cache")
    result = epicfeat("extract", "--split", "all", "--videos", str(synthetic_dataset.videos),
                      "--annotations", str(synthetic_dataset.annotations), "--cache", str(cache),
                      "--weights", "random", "--resize", "36", "--crop", "32", "--decode-workers", "0",
                      "--device", "cpu", "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr
    return synthetic_dataset, cache


def interrupt_when(command: list[str], ready, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``command``, send SIGINT (Ctrl-C) once ``ready()`` is true, and return what the process left."""
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen([EPICFEAT, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before it could be interrupted: {process.communicate()}"
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ctrl_c_during_train_temporal_says_resume_and_exits_130(tiny_features, tmp_path):
    dataset, cache = tiny_features
    out = tmp_path / "run"
    command = ["train-temporal", "--annotations", str(dataset.annotations), "--cache", str(cache), "--out", str(out),
               "--frames", "4", "--hidden", "8", "--batch-size", "4", "--epochs", "100000", "--patience", "0",
               "--device", "cpu", "--no-progress"]
    result = interrupt_when(command, lambda: (out / "last.pt").is_file())
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert "--resume" in result.stderr.splitlines()[-1]
    assert (out / "last.pt").is_file()  # the finished epochs are kept


def test_ctrl_c_during_extract_says_rerun_and_exits_130(synthetic_dataset, tmp_path):
    cache = tmp_path / "cache"
    # Every frame at 224 px keeps the random ResNet50 busy for minutes: long enough to be interrupted mid-run.
    command = ["extract", "--split", "all", "--videos", str(synthetic_dataset.videos),
               "--annotations", str(synthetic_dataset.annotations), "--cache", str(cache),
               "--weights", "random", "--fps", "60", "--decode-workers", "0", "--device", "cpu", "--no-progress"]
    result = interrupt_when(command, lambda: any(cache.glob("*/featureset.json")))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert "re-run the same command to resume" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_an_installed_wheel_works_outside_the_checkout(tmp_path):
    """Defaults live in the dataclasses: a wheel (which has no configs/ folder) shows and uses the same ones."""
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("epicfeat-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The new venv sees this environment's packages (torch is gigabytes) through a .pth file, which adds their
    # folders to sys.path without running their .pth files: the editable epicfeat of this checkout stays out.
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "outer.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = dict(cwd=elsewhere, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    where = subprocess.run([venv / "bin" / "python", "-c", "import epicfeat; print(epicfeat.__file__)"], **run)
    assert Path(where.stdout.strip()).is_relative_to(venv), where
    for command in (["extract", "--help"], ["demo", "--help"]):
        result = subprocess.run([venv / "bin" / "epicfeat", *command], **run)
        assert result.returncode == 0, result.stderr
    assert "(default: demo_out)" in one_line(result.stdout)
    typo = subprocess.run([venv / "bin" / "epicfeat", "demo", "--epochs", "many"], **run)
    assert typo.returncode == 2 and typo.stderr.startswith("error: ")


@pytest.mark.slow
def test_demo_recipe_through_the_console_script_keeps_results_on_stdout(tmp_path):
    """`epicfeat demo --config configs/demo_tiny.yaml`: results (tables) on stdout, progress (stages) on stderr."""
    result = epicfeat("demo", "--config", str(REPO / "configs" / "demo_tiny.yaml"), "--epochs", "1",
                      "--out", str(tmp_path / "demo"), "--device", "cpu", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation, official EPIC-100 metrics" in result.stdout
    assert "1/6 generate" in result.stderr and "1/6 generate" not in result.stdout
    saved = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert (saved["dataset"], saved["epochs"], saved["frames"]) == ("tiny", 1, [1, 4, 8])  # recipe, then the flag
    metrics = json.loads((tmp_path / "demo" / "results.json").read_text())["metrics"]
    assert list(metrics) == ["1-frame", "4-frame", "8-frame", "ensemble 4f+8f"]
