"""What every benchmark shares, written once: the checkout on ``sys.path``, argument parsing, work folders, synthetic
test videos, the machine line, and the side-by-side tables with their verdicts. Each ``bench_*.py`` keeps only its
own measurements.

A benchmark runs as a script (``python benchmarks/bench_x.py``), so this folder is on ``sys.path``; import this
module before any ``epicfeat`` module, since importing it puts the checkout first on ``sys.path``::

    from common import machine_line, new_parser, row, synthetic_video, table, verdict, work_folder  # first import

The API, stable (add to it rather than change it):

Paths
    ``REPO``                    the checkout (this folder's parent), first on ``sys.path`` once this is imported,
                                so the benchmarks run from a checkout without installing the package
    ``SHARED_ANNOTATIONS``      the real EPIC-100 annotation CSVs beside the checkout (../shared/epic100-annotations)
Arguments
    ``new_parser(doc)``         an ``ArgumentParser`` whose ``--help`` shows ``doc`` (the module docstring) as written
    ``add_workdir(parser, what, default=None)``   ``--workdir``: keep ``what`` there and reuse it next time
    ``add_gpu(parser, help, dry_run=True)``       ``--gpu``, and ``--gpu-device`` (cuda; cpu: a dry run of the code)
    ``add_seed(parser)``        ``--seed`` (default 0)
Work folders
    ``work_folder(path, prefix)``   context manager: ``path`` (created, kept), or a temporary folder deleted at the end
Test data (``epicfeat.data.synthetic``)
    ``synthetic_video(path, seconds=..., width=640, height=360, fps="60000/1001", seed=0)``   an H.264 video of the
                                synthetic dataset's look, reused when an identical one is already there
    ``synthetic_dataset(root, spec, seed=0)``   ``(SyntheticDataset, seconds it took)``
Machine
    ``cpu_name()``, ``machine_line()``  e.g. "CPU: Intel Xeon ..., native bf16: yes, 2 cores; torch 2.x, 2 threads"
    ``gpu_device(name)``        ``torch.device``, or ``None`` after printing "GPU: skipped ..." when CUDA is missing
    ``synchronize(device)``     wait for a CUDA device's queued work (nothing elsewhere): call before reading a clock
Printing
    ``row(name, value, note="")``   one aligned line: name, value (right-aligned), note
    ``verdict(value, target, at_least=True)``   "PASS" or "FAIL"
    ``table(headers, rows)``    a column-aligned table as text (first column left-aligned, the others right)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from epicfeat.data import synthetic  # noqa: E402
from epicfeat.devices import native_bf16_cpu  # noqa: E402

SHARED_ANNOTATIONS = REPO.parent / "shared" / "epic100-annotations"


# --- arguments ----------------------------------------------------------------------------------------------------


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` prints ``doc`` (pass the module's ``__doc__``) with its line breaks."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_workdir(parser: argparse.ArgumentParser, what: str, default: Path | None = None) -> None:
    """``--workdir``: where ``what`` (e.g. "the synthetic datasets") is kept and reused by later runs.

    Without a default the benchmark uses a temporary folder, deleted at the end (see ``work_folder``).
    """
    where = "default: %(default)s" if default is not None else "default: a temporary folder, deleted at the end"
    parser.add_argument("--workdir", type=Path, default=default,
                        help=f"keep {what} here and reuse it next time ({where})")


def add_gpu(parser: argparse.ArgumentParser, help: str, *, dry_run: bool = True) -> None:
    """``--gpu`` (the benchmark's GPU section, help text ``help``); with ``dry_run`` also ``--gpu-device``, so that
    ``--gpu-device cpu`` runs the GPU section's code on a CPU at small settings."""
    parser.add_argument("--gpu", action="store_true", help=help)
    if dry_run:
        parser.add_argument("--gpu-device", default="cuda",
                            help="device of the GPU section (default: %(default)s; cpu: a dry run of its code)")


def add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")


# --- work folders and test data -----------------------------------------------------------------------------------


@contextlib.contextmanager
def work_folder(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (created if missing, kept afterwards), or a fresh temporary folder removed when the block ends."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def synthetic_video(path: Path, *, seconds: float, width: int = 640, height: int = 360, fps: str = "60000/1001",
               seed: int = 0) -> Path:
    """An H.264 yuv420p video at ``path`` made by ``epicfeat.data.synthetic.write_synthetic_video``.

    Kept beside it, ``<path>.json`` records how it was made (with the generator's version); a later call with
    the same arguments reuses the file instead of encoding it again. ``fps`` is exact: "60000/1001", "50", "30".
    """
    recipe = {"seconds": seconds, "width": width, "height": height, "fps": fps, "seed": seed,
              "generator": synthetic.GENERATOR_VERSION}
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == recipe:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_synthetic_video(path, seconds=seconds, width=width, height=height, fps=fps, seed=seed)
    sidecar.write_text(json.dumps(recipe) + "\n")  # after the video: marks it complete
    return path


def synthetic_dataset(root: Path, spec: synthetic.SyntheticSpec,
                      seed: int = 0) -> tuple[synthetic.SyntheticDataset, float]:
    """``generate_synthetic_dataset`` (reused when ``root`` holds the same spec and seed) and the seconds it took."""
    started = time.perf_counter()
    dataset = synthetic.generate_synthetic_dataset(root, seed=seed, spec=spec)
    return dataset, time.perf_counter() - started


# --- the machine --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line() -> str:
    """What a CPU timing depends on: model, native bf16 (AMX / AVX512-BF16), cores, torch and its threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (f"CPU: {cpu_name()}, native bf16: {'yes' if native_bf16_cpu() else 'no'}, {cores} cores; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def gpu_device(name: str = "cuda") -> torch.device | None:
    """The device of a GPU section; ``None`` (after saying so) when it asks for CUDA and PyTorch sees none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("GPU: skipped, PyTorch sees no CUDA device here")
        return None
    return device


def median_seconds(fn, repeats: int, *, warm_up: bool = False) -> tuple[float, object]:
    """Median wall seconds of ``repeats`` calls of ``fn`` (after one untimed call when ``warm_up``) and the last
    call's result. The median, because on a shared machine single calls are disturbed by other processes."""
    if warm_up:
        fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- printing -----------------------------------------------------------------------------------------------------


def row(name: str, value: str, note: str = "") -> None:
    """One line of a side-by-side listing: the name, the value right-aligned, then a note."""
    print(f"  {name:<46} {value:>16}  {note}".rstrip())


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    """PASS when ``value`` reaches ``target`` (``at_least``: value >= target, else value <= target), else FAIL."""
    passed = value >= target if at_least else value <= target
    return "PASS" if passed else "FAIL"


def table(headers: list[str], rows: list[list]) -> str:
    """``rows`` under ``headers`` as aligned text: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in line] for line in [headers, *rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)
