"""Options that mean the same in every command. ``None`` defaults mean "not given: use the config"."""
from pathlib import Path
from typing import Annotated, Optional

import typer

Videos = Annotated[Optional[Path], typer.Option("--videos", help="Video root: <root>/P01/P01_01.MP4 or <root>/P01/videos/P01_01.MP4.", show_default=False)]
Annotations = Annotated[Optional[Path], typer.Option("--annotations", help="Folder holding the EPIC_100_*.csv files.", show_default=False)]
Cache = Annotated[Optional[Path], typer.Option("--cache", help="Folder of feature stores [config default: cache/].", show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML config; its keys override configs/<command>.yaml, flags override both.", show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", help="Folder for this run's outputs.", show_default=False)]
