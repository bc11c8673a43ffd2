"""Config resolution: dataclass defaults < --config recipe < flags; unknown keys are errors."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from epicfeat import configs
from epicfeat.recipes import (
    ConfigError,
    config_to_dict,
    from_dict,
    resolve_config,
    save_config,
)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ToyConfig:
    lr: float = 0.1
    frames: int = 16
    name: str = "toy"
    out: Path = Path("runs")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fps: float | None = 10.0
    deterministic: bool = False


def test_layers_override_in_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("lr: 1.5e-4\nframes: 8\nname: from-recipe\nmean: [0.1, 0.2, 0.3]\n")
    cfg = resolve_config(ToyConfig, config_file=user, overrides={"name": "flag", "lr": None})
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


def test_every_shipped_recipe_is_valid():
    """Each YAML in configs/ must load into its command's dataclass: a stale key would break users' runs."""
    owners = {"temporal_16f": configs.TrainTemporalConfig, "temporal_32f": configs.TrainTemporalConfig,
              "compare_demo": configs.TrainTemporalConfig, "demo_tiny": configs.DemoConfig}
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {path.stem for path in files} == set(owners), "a recipe was added or removed: list it here"
    for path in files:
        resolve_config(owners[path.stem], config_file=path)


def test_recipes_hold_only_their_differences():
    """configs/ holds recipes, not copies of the defaults: a copied default would hide a change of the dataclass."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cls = {"demo_tiny": configs.DemoConfig}.get(path.stem, configs.TrainTemporalConfig)
        recipe, defaults = resolve_config(cls, config_file=path), cls()
        keys = set(yaml.safe_load(path.read_text())) - {"frames"}  # the key a 16f/32f recipe is named after stays
        repeated = [key for key in sorted(keys) if getattr(recipe, key) == getattr(defaults, key)]
        assert not repeated, f"{path.name} repeats defaults: {repeated}"


def test_seed_recipes_differ_only_in_frames_and_out():
    r16 = resolve_config(configs.TrainTemporalConfig, config_file=REPO / "configs" / "temporal_16f.yaml")
    r32 = resolve_config(configs.TrainTemporalConfig, config_file=REPO / "configs" / "temporal_32f.yaml")
    assert (r16.frames, r32.frames) == (16, 32)
    assert dataclasses.replace(r16, frames=32, out=r32.out) == r32
    assert r16.lr == 1.5e-4 and r16.batch_size == 100 and r16.hidden == 512 and r16.patience == 10


def test_every_config_field_has_help():
    for cls in vars(configs).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
            assert not missing, f"{cls.__name__} fields without help: {missing}"
