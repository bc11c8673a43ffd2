"""``epicfeat cache info | verify | export``: look into, check and convert the feature sets under ``--cache``."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config
from epicfeat.configs import CacheConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Inspect, verify and export feature sets.")

FeatureSetKey = Annotated[Optional[str], typer.Option("--set", help="Only this feature set: its key (folder name under --cache) or its folder.", show_default=False)]


@app.command()
def info(cache: opt.Cache = None) -> None:
    """One table per feature set: identity, videos complete / partial / failed, rows, hours of video, size."""
    from rich.console import Console
    from rich.table import Table

    from epicfeat.store import FeatureStore

    cfg = resolve_config(CacheConfig, defaults="cache", overrides={"cache": cache})
    console = Console()
    stores = FeatureStore.list_sets(cfg.cache)
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
        table.add_row("videos", f"{facts['videos_complete']} complete, {facts['videos_partial']} partial, "
                                f"{facts['videos_failed']} failed")
        table.add_row("features", f"{facts['rows']:,} rows from {facts['hours']:.2f} hours of video")
        table.add_row("on disk", _human_bytes(facts["bytes"]))
        console.print(table)


@app.command()
def verify(cache: opt.Cache = None, feature_set: FeatureSetKey = None) -> None:
    """Check every complete video (shape, row counts, timestamps, NaN/inf, attributes); exit 1 on any problem."""
    from rich.console import Console

    from epicfeat.store import FeatureStore

    cfg = resolve_config(CacheConfig, defaults="cache", overrides={"cache": cache})
    console = Console(soft_wrap=True)  # one problem per line, whatever the terminal width
    stores = [_pick_set(cfg.cache, feature_set)] if feature_set else FeatureStore.list_sets(cfg.cache)
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


@app.command()
def export(
    out: Annotated[Optional[Path], typer.Option("--out", help="The file to write, e.g. features.h5.", show_default=False)] = None,
    output_format: Annotated[str, typer.Option("--format", help="Output format (hdf5 is the only one).")] = "hdf5",
    cache: opt.Cache = None,
    feature_set: FeatureSetKey = None,
) -> None:
    """Write one feature set's complete videos to a single HDF5 file (a group per video, same attributes)."""
    from epicfeat.errors import EpicfeatError
    from epicfeat.store import FeatureStore, export_hdf5

    cfg = resolve_config(CacheConfig, defaults="cache", overrides={"cache": cache})
    if output_format.lower() not in ("hdf5", "h5"):
        raise EpicfeatError(f"--format {output_format} is not supported; use --format hdf5")
    if out is None:
        raise EpicfeatError("no output file given: pass --out FILE, e.g. --out features.h5")
    if feature_set:
        store = _pick_set(cfg.cache, feature_set)
    else:
        stores = FeatureStore.list_sets(cfg.cache)
        if not stores:
            raise EpicfeatError(f"no feature sets under {cfg.cache}: create one with `epicfeat extract`, or point "
                                "--cache at the folder that holds them")
        if len(stores) > 1:
            keys = ", ".join(s.path.name for s in stores) or "none"
            raise EpicfeatError(f"{cfg.cache} holds {len(stores)} feature sets ({keys}); choose one with --set KEY")
        store = stores[0]
    path = export_hdf5(store, out)
    typer.echo(f"wrote {len(store.complete_videos())} videos of {store.path.name} to {path} "
               f"({_human_bytes(path.stat().st_size)})")


def _pick_set(cache: Path, key_or_path: str):
    from epicfeat.store import FeatureStore

    candidate = Path(key_or_path)
    return FeatureStore.open(candidate if (candidate / "featureset.json").is_file() else Path(cache) / key_or_path)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
