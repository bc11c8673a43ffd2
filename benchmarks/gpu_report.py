"""The GPU check's report: each step's status and the numbers its benchmark saved, as one JSON and one markdown table.

    python benchmarks/gpu_report.py WORK OUT DEVICE     (run by benchmarks/gpu_check.sh; stdlib only)

WORK holds ``steps.tsv`` (name, exit code, seconds, limit per step) and each benchmark's ``--out`` JSON; OUT receives
``gpu_check.json`` and ``gpu_check.md``. A step that failed or ran out of time is reported as such, with whatever
numbers it saved before.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def status(code: int) -> str:
    return {0: "ok", 124: "TIMED OUT", 137: "KILLED (time)"}.get(code, f"FAILED ({code})")


def pytest_summary(log: str) -> str:
    """The last pytest summary line of the CUDA tests ("3 passed, 1 skipped in 12.3s")."""
    section = log.split("=== cuda_tests", 1)[-1].split("=== temporal", 1)[0]
    lines = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?)\s*=*$", section, re.MULTILINE)
    return lines[-1] if lines else "no summary (see the log)"


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']})", "", "| step | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} ({s['limit']}) |" for s in report["steps"]]
    lines += ["", f"CUDA tests: {report['cuda_tests']}", ""]
    for r in report["temporal"].get("real_loop", []):
        lines += ["| stage two, EPIC-100 size | value |", "|---|---|",
                  f"| precision | {r['precision']} |", f"| train / validation segments | {r['segments']:,} / "
                  f"{r['val_segments']:,} |", f"| epoch (train_one_epoch) | {r['epoch']:.2f} s |",
                  f"| validation (evaluate) | {r['validate']:.2f} s |",
                  f"| train + validate | {r['epoch'] + r['validate']:.2f} s |",
                  f"| model alone, the epoch's steps | {r['model_step'] * r['steps']:.2f} s |",
                  f"| peak memory | {r.get('peak_gib', float('nan')):.1f} GiB |",
                  f"| the same epoch without the CUDA graph | {r.get('eager_epoch', float('nan')):.2f} s |",
                  f"| launches per step (a graph = 1) | {r.get('launches_per_step', float('nan')):.0f} |",
                  f"| epic_metrics alone, 9,668 segments | {1000 * r.get('metrics_s', float('nan')):.0f} ms |", ""]
    heads = report["temporal"].get("heads", [])
    if heads:
        lines += ["| head (eager steps) | epoch | model alone | parameters |", "|---|---|---|---|"]
        lines += [f"| {h['head']} | {h['epoch_s']:.2f} s | {h['model_s']:.2f} s | {h['parameters']:,} |" for h in heads]
        lines.append("")
    gpu = report["extract"].get("gpu", {})
    variants = gpu.get("model", {}).get("variants", {})
    if variants:
        lines += ["| ResNet50 alone (batch 256) | frames/s |", "|---|---|"]
        lines += [f"| {name} | {v['rows_per_s']:,.0f} |" for name, v in variants.items()] + [""]
    if gpu.get("end_to_end"):
        lines += ["| extract end to end | decode alone rows/s | extract rows/s | GPU busy |", "|---|---|---|---|"]
        for label, r in gpu["end_to_end"].items():
            decode = gpu.get("decode_workers", {}).get(label, {}).get("steady_rows_per_s", float("nan"))
            busy = r.get("gpu_busy_share")
            lines.append(f"| {label} | {decode:,.0f} | {r['steady_rows_per_s']:,.0f} | "
                         f"{'-' if busy is None else f'{busy:.0%}'} |")
        lines.append("")
    finetune = {k: v for k, v in report["finetune"].items() if k.startswith("T")}
    if finetune:
        lines += ["| finetune | clips/s | peak memory | waiting on decoding | EPIC-100 epoch |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['clips_per_s']:.1f} | {v['peak_gpu_memory_gb']:.1f} GiB | "
                  f"{v['data_wait_share']:.0%} | {v['epic_epoch_minutes']:.1f} min |" for k, v in finetune.items()]
        lines.append("")
    predict = {k: v for k, v in report["predict"].items() if k.startswith("T")}
    if predict:
        lines += ["| predict | backbone b1 | live (camera 30 fps) | latency | backbone bN | file |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['backbone_b1_fps']:.0f} f/s | {v['live_fps']:.1f} f/s | {v['latency_ms']:.0f} ms | "
                  f"{v['backbone_bN_fps']:.0f} f/s | {v['file_fps']:.1f} f/s |" for k, v in predict.items()]
    return "\n".join(lines) + "\n"


def main(work: Path, out: Path, device: str) -> None:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, code, seconds, limit = line.split("\t")
        steps.append({"name": name, "exit_code": int(code), "status": status(int(code)), "seconds": int(seconds),
                      "limit": int(limit)})
    log = (out / "gpu_check.log").read_text(errors="replace")
    report = {"device": device, "steps": steps, "cuda_tests": pytest_summary(log),
              **{name: read_json(work / f"{name}.json") for name in ("temporal", "extract", "finetune", "predict")}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
