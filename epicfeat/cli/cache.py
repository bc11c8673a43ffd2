"""``epicfeat cache info | verify | export``: look into, check and convert the feature sets under ``--cache``.

The store and HDF5 modules load when a command runs: zarr and h5py would slow every ``epicfeat`` call.
"""
import typer
from rich.console import Console
from rich.table import Table

from epicfeat.cli._options import config_command
from epicfeat.configs import CacheConfig, CacheExportConfig
from epicfeat.errors import EpicfeatError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Inspect, verify and export feature sets.")


def _info(cfg: CacheConfig) -> None:
    console = Console()
    stores = _stores(cfg)
    if not stores:
        console.print(f"no feature sets under {cfg.cache} (create one with `epicfeat extract`)")
        return
    for store in stores:
        facts = store.info()
        identity = facts["identity"]
        table = Table(title=facts["key"], show_header=False, title_justify="left")
        table.add_column("", style="bold")
        table.add_column("")
        table.add_row("folder", facts["path"])
        table.add_row("backbone", f"{identity['backbone']} ({identity['weights']}, sha {identity['weights_sha']}, "
                                  f"{identity['precision']})")
        rate = "every frame" if identity["fps"] is None else f"{identity['fps']:g} per second"
        table.add_row("rows", f"{rate}, {identity['feature_dim']}-d {identity['dtype']}")
        table.add_row("preprocessing", f"resize {identity['resize']}, crop {identity['crop']}, "
                                       f"mean {identity['mean']}, std {identity['std']}")
        table.add_row("source", identity["source"])
        table.add_row("run settings", _run_settings(identity))
        table.add_row("videos", f"{facts['videos_complete']} complete, {facts['videos_partial']} partial, "
                                f"{facts['videos_failed']} failed")
        table.add_row("features", f"{facts['rows']:,} rows from {facts['hours']:.2f} hours of video")
        table.add_row("on disk", _human_bytes(facts["bytes"]))
        console.print(table)


def _run_settings(identity: dict) -> str:
    """The recorded settings that move float16 values by a step: two sets whose other fields agree differ here."""
    from epicfeat.store import NUMERIC_SETTINGS

    labels = {"batch_size": "batch"}
    return ", ".join(f"{labels.get(name, name)} {_shown(identity[name])}" for name in NUMERIC_SETTINGS)


def _shown(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)  # a batch of 1 is "1", not "on"


def _verify(cfg: CacheConfig) -> None:
    console = Console(soft_wrap=True)  # one problem per line, whatever the terminal width
    stores = _stores(cfg)
    if not stores:
        console.print(f"no feature sets under {cfg.cache}: nothing to verify")
        return
    failed = False
    for store in stores:
        problems = store.verify()
        videos = len(store.complete_videos())
        if problems:
            failed = True
            console.print(f"[red]{store.path.name}: {len(problems)} problem(s) in {videos} complete videos[/]")
            for problem in problems:
                console.print(f"  {problem}", markup=False)
        else:
            console.print(f"[green]{store.path.name}: {videos} complete videos, all fine[/]")
        partial = store.partial_videos()
        if partial:  # not a problem of the stored data: `epicfeat extract` redoes them
            console.print(f"  {len(partial)} partial video(s), redone by the next extract: {', '.join(partial)}",
                          markup=False)
    if failed:
        raise typer.Exit(1)


def _export(cfg: CacheExportConfig) -> None:
    from epicfeat.hdf5 import export_hdf5
    from epicfeat.store import open_feature_set

    if cfg.out is None:
        raise EpicfeatError("no output file given: pass --out FILE, e.g. --out features.h5")
    store = open_feature_set(cfg.cache, cfg.feature_set, option="--set")
    path = export_hdf5(store, cfg.out)
    typer.echo(f"wrote {len(store.complete_videos())} videos of {store.path.name} to {path} "
               f"({_human_bytes(path.stat().st_size)})")


def _stores(cfg: CacheConfig) -> list:
    """The feature set named by --set, or every set under --cache."""
    from epicfeat.store import FeatureStore, open_feature_set

    if cfg.feature_set is None:
        return FeatureStore.list_sets(cfg.cache)
    return [open_feature_set(cfg.cache, cfg.feature_set, option="--set")]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


app.command("info")(config_command(
    CacheConfig, _info, config_file=False,
    doc="One table per feature set: identity, videos complete / partial / failed, rows, hours of video, size."))
app.command("verify")(config_command(
    CacheConfig, _verify, config_file=False,
    doc="Check every complete video (shape, row counts, timestamps, NaN/inf, attributes); exit 1 on any problem."))
app.command("export")(config_command(
    CacheExportConfig, _export, config_file=False,
    doc="Write one feature set's complete videos to a single HDF5 file (a group per video, same attributes)."))
