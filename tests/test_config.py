"""Config resolution: defaults < configs/<name>.yaml < --config file < flags; unknown keys are errors."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from epicfeat import config as cfgmod
from epicfeat.config import ConfigError, config_to_dict, from_dict, resolve_config, save_config


@dataclass(frozen=True)
class ToyConfig:
    lr: float = 0.1
    frames: int = 16
    name: str = "toy"
    out: Path = Path("runs")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fps: float | None = 10.0
    deterministic: bool = False


def test_layers_override_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(cfgmod, "CONFIG_DIR", tmp_path)
    (tmp_path / "toy.yaml").write_text("lr: 1.5e-4\nframes: 32\nname: from-defaults\n")
    user = tmp_path / "user.yaml"
    user.write_text("frames: 8\nmean: [0.1, 0.2, 0.3]\n")
    cfg = resolve_config(ToyConfig, defaults="toy", config_file=user, overrides={"name": "flag", "lr": None})
    # YAML 1.1 reads 1.5e-4 as a string: it must still come out a float
    assert cfg == ToyConfig(lr=1.5e-4, frames=8, name="flag", mean=(0.1, 0.2, 0.3))
    assert isinstance(cfg.lr, float) and isinstance(cfg.mean, tuple)


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'lrr'.*valid keys are"):
        resolve_config(ToyConfig, config_file=bad)
    with pytest.raises(ConfigError, match="command-line options: unknown key 'nope'"):
        resolve_config(ToyConfig, overrides={"nope": 1})


def test_wrong_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'frames' = 'many'"):
        from_dict(ToyConfig, {"frames": "many"})
    with pytest.raises(ConfigError, match="'frames' = 2.5"):
        from_dict(ToyConfig, {"frames": 2.5})
    with pytest.raises(ConfigError, match="expected 3 values"):
        from_dict(ToyConfig, {"mean": [1, 2]})
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
        resolve_config(ToyConfig, config_file=tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(ToyConfig, config_file=tmp_path / "absent.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = ToyConfig(lr=3e-4, out=tmp_path / "x", fps=None, deterministic=True)
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["out"] == str(tmp_path / "x")
    assert resolve_config(ToyConfig, config_file=path) == cfg
    assert config_to_dict(cfg)["mean"] == [0.5, 0.5, 0.5]
    assert not list(path.parent.glob(".*tmp"))  # the temp file of the atomic write is gone


def test_every_shipped_config_file_is_valid():
    """Each YAML in configs/ must load into its command's dataclass: a stale key would break users' runs."""
    import importlib

    # configs/<stem>.yaml -> "module:ConfigClass" of the command that reads it
    owners = {
        "extract": "epicfeat.extract:ExtractConfig",
        "train_temporal": "epicfeat.temporal.train:TrainTemporalConfig",
        "temporal_16f": "epicfeat.temporal.train:TrainTemporalConfig",
        "temporal_32f": "epicfeat.temporal.train:TrainTemporalConfig",
        "evaluate": "epicfeat.evaluate:EvaluateConfig",
        "submit": "epicfeat.evaluate:SubmitConfig",
        "demo": "epicfeat.demo:DemoConfig",
        "finetune": "epicfeat.finetune:FinetuneConfig",
        "predict": "epicfeat.predict:PredictConfig",
        "export": "epicfeat.export:ExportConfig",
    }
    files = sorted(cfgmod.CONFIG_DIR.glob("*.yaml"))
    assert files, "configs/ holds no YAML files"
    for path in files:
        owner = owners.get(path.stem)
        assert owner is not None, f"{path.name} has no known owning config class; add it to this test"
        module, name = owner.split(":")
        resolve_config(getattr(importlib.import_module(module), name), config_file=path)
