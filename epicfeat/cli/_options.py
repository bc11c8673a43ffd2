"""Options that mean the same in every command. ``None`` defaults mean "not given: use the config"."""
from pathlib import Path
from typing import Annotated, Optional

import typer

Videos = Annotated[Optional[Path], typer.Option("--videos", help="Video root: <root>/P01/P01_01.MP4 or <root>/P01/videos/P01_01.MP4.", show_default=False)]
Annotations = Annotated[Optional[Path], typer.Option("--annotations", help="Folder holding the EPIC_100_*.csv files.", show_default=False)]
Cache = Annotated[Optional[Path], typer.Option("--cache", help="Folder of feature stores (default: cache/).", show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML config; its keys override configs/<command>.yaml, flags override both.", show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", help="Folder for this run's outputs.", show_default=False)]
FeatureSet = Annotated[Optional[str], typer.Option("--feature-set", help="Feature set key under --cache, or its path (default: the checkpoints' own).", show_default=False)]
Checkpoints = Annotated[Optional[list[Path]], typer.Option("--checkpoint", metavar="PATH", help="A train-temporal best.pt; repeat the option to ensemble several models.", show_default=False)]
EnsembleWeights = Annotated[Optional[list[float]], typer.Option("--ensemble-weight", metavar="W", help="One weight per --checkpoint, in order (normalised; default: equal).", show_default=False)]
EnsembleMode = Annotated[Optional[str], typer.Option("--ensemble-mode", help="probs: average softmax probabilities (default) | logits: average logits.", show_default=False)]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N (default: auto).", show_default=False)]
Progress = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars and summary tables.", show_default=False)]
