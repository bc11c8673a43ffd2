"""`epicfeat cache info | verify | export` on small feature sets built in a temp folder."""
import dataclasses

import h5py
import numpy as np
import pytest
import typer
import zarr
from typer.testing import CliRunner

from epicfeat.cli import cache as cache_cli
from epicfeat.errors import EpicfeatError
from epicfeat.store import FeatureSetIdentity, FeatureStore

SOURCE = {"source_path": "/videos/P01/P01_01.MP4", "source_fps": 50.0, "duration": 36.0, "width": 640, "height": 360}


SETTINGS = dict(decoder="pyav-18.1.0-libavcodec-62.28.102", device="cpu-AVX512", tf32=False, batch_size=64,
                channels_last=True, compile=False, fold_bn=True)


def identity(**changes) -> FeatureSetIdentity:
    base = FeatureSetIdentity(weights="random-seed0", weights_sha="0123456789abcdef", fps=10.0, resize=128,
                              crop=112, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **SETTINGS)
    return dataclasses.replace(base, **changes)


def add_video(store: FeatureStore, video_id: str, rows: int, *, seed: int = 0) -> np.ndarray:
    features = np.random.default_rng(seed).standard_normal((rows, 2048)).astype(np.float16)  # (rows, 2048)
    with store.writer(video_id, attrs={**SOURCE, "duration": rows / 10}) as writer:  # 10 rows/s
        writer.append(features, np.arange(rows) / 10, np.arange(rows) * 5)
        writer.commit()
    return features


def run(*args: str):
    app = typer.Typer()  # the lead registers cache.app on the real CLI; this mirrors that registration
    app.add_typer(cache_cli.app, name="cache")
    return CliRunner().invoke(app, ["cache", *args], env={"COLUMNS": "200"})


@pytest.fixture
def cache(tmp_path):
    store = FeatureStore.create(tmp_path / "cache", identity())
    add_video(store, "P01_01", 360)
    add_video(store, "P01_02", 20, seed=1)
    store.writer("P01_03", attrs=SOURCE).close()  # abandoned: partial
    store.record_failure("P01_04", "zero-byte file")
    return tmp_path / "cache"


def test_info_prints_one_table_per_set(cache):
    FeatureStore.create(cache, identity(fps=5.0))
    result = run("info", "--cache", str(cache))
    assert result.exit_code == 0, result.output
    assert identity().key() in result.output and identity(fps=5.0).key() in result.output
    assert "2 complete, 1 partial, 1 failed" in result.output
    assert "380 rows from 0.01 hours of video" in result.output  # 36 s + 2 s = 0.0106 h
    assert "0 complete, 0 partial, 0 failed" in result.output


def test_info_tells_apart_two_sets_that_differ_only_in_run_settings(tmp_path):
    """Same weights, rate and preprocessing: only the run settings (and the key's hash) differ, so info prints them."""
    FeatureStore.create(tmp_path / "cache", identity(fold_bn=True))
    FeatureStore.create(tmp_path / "cache", identity(fold_bn=False))
    FeatureStore.create(tmp_path / "cache", identity(batch_size=1))
    result = run("info", "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    common = ("decoder pyav-18.1.0-libavcodec-62.28.102, device cpu-AVX512, tf32 off, batch 64, channels_last on, "
              "compile off, fold_bn")
    assert f"{common} on" in result.output and f"{common} off" in result.output
    assert "batch 1, channels_last on" in result.output  # a batch of 1 is a number, not "on"


def test_info_on_an_empty_cache_says_how_to_fill_it(tmp_path):
    result = run("info", "--cache", str(tmp_path / "empty"))
    assert result.exit_code == 0 and "no feature sets" in result.output and "epicfeat extract" in result.output


def test_verify_passes_then_fails_naming_the_video(cache):
    result = run("verify", "--cache", str(cache))
    assert result.exit_code == 0, result.output
    assert "2 complete videos, all fine" in result.output
    assert "1 partial video(s), redone by the next extract: P01_03" in result.output
    store = FeatureStore.open(cache / identity().key())
    group = zarr.open_group(store.path / "videos" / "P01_02", mode="r+")
    group["features"][3, 3] = np.nan
    result = run("verify", "--cache", str(cache), "--set", store.path.name)
    assert result.exit_code == 1
    assert "2 problem(s) in 2 complete videos" in result.output
    assert "P01_02: features hold NaN/inf in 1 rows (first: row 3)" in result.output
    assert "P01_02: features: 1 chunk(s) do not match the checksum stored at commit (chunks 0)" in result.output


def test_verify_reports_a_truncated_chunk_per_video_and_checks_the_rest(cache):
    store = FeatureStore.open(cache / identity().key())
    chunk = store.path / "videos" / "P01_01" / "features" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    result = run("verify", "--cache", str(cache))
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "1 problem(s) in 2 complete videos" in result.output
    assert "P01_01: features chunk 1 (rows 256-511) cannot be read (RuntimeError" in result.output
    assert "P01_02" not in result.output.split("problem(s)")[1].split("partial")[0]  # checked, and fine


def test_export_writes_hdf5(cache, tmp_path):
    out = tmp_path / "features.h5"
    result = run("export", "--cache", str(cache), "--format", "hdf5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote 2 videos of {identity().key()} to {out}" in result.output
    store = FeatureStore.open(cache / identity().key())
    with h5py.File(out, "r") as h5:
        assert sorted(h5["videos"]) == ["P01_01", "P01_02"]
        np.testing.assert_array_equal(h5["videos/P01_01/features"][:], store.read("P01_01").features[:])


def test_export_needs_a_set_when_there_are_several(cache, tmp_path):
    other = FeatureStore.create(cache, identity(crop=96))
    add_video(other, "P02_01", 5)
    out = tmp_path / "other.h5"
    result = run("export", "--cache", str(cache), "--out", str(out))
    assert isinstance(result.exception, EpicfeatError) and "choose one with --set" in str(result.exception)
    result = run("export", "--cache", str(cache), "--out", str(out), "--set", other.path.name)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        assert list(h5["videos"]) == ["P02_01"]
    result = run("export", "--cache", str(cache), "--out", str(out), "--set", str(other.path), "--format", "csv")
    # --format is a choice now: the CLI refuses the value itself (a usage error, exit 2) and names the valid one
    assert result.exit_code == 2 and "'csv' is not one of 'hdf5'" in result.output


def test_an_unknown_set_is_named_with_the_sets_there(cache):
    """info / verify / export resolve --set with the same function as train-temporal (store.open_feature_set)."""
    for command in ("info", "verify"):
        result = run(command, "--cache", str(cache), "--set", "nope")
        assert isinstance(result.exception, EpicfeatError), result.output
        assert "feature set 'nope' not found" in str(result.exception)
        assert f"available under {cache}: " in str(result.exception)
