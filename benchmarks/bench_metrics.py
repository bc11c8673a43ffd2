"""Validation metrics per epoch: the numpy path (``epic_metrics``, logits copied to the host) vs the torch path
(``epic_metrics_torch`` where the logits are), side by side in one run, on EPIC-100's validation size.

    python benchmarks/bench_metrics.py [--segments 9668] [--repeats 3] [--gpu]

Random float32 logits (97 verbs, 300 nouns, labels near the top so action@1 is ~40 %), tail and unseen subsets.
Prints seconds per call (median of --repeats) and whether the two give identical metrics.
"""
from __future__ import annotations

import numpy as np
import torch
from common import machine_line, median_seconds, new_parser

from epicfeat.metrics import epic_metrics
from epicfeat.metrics_torch import epic_metrics_torch


def _data(segments: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    verbs = rng.normal(0, 3, (segments, 97)).astype(np.float32)
    nouns = rng.normal(0, 3, (segments, 300)).astype(np.float32)
    verb_labels = np.where(rng.random(segments) < 0.6, verbs.argmax(1), rng.integers(0, 97, segments))
    noun_labels = np.where(rng.random(segments) < 0.6, nouns.argmax(1), rng.integers(0, 300, segments))
    subsets = dict(tail_verbs=range(50, 97), tail_nouns=range(100, 300), unseen=rng.random(segments) < 0.1)
    return (verbs, nouns, verb_labels, noun_labels), subsets


def main() -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--segments", type=int, default=9668)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also time the torch path on CUDA")
    args = parser.parse_args()
    arrays, subsets = _data(args.segments)
    print(machine_line())
    print(f"{args.segments} segments, torch threads {torch.get_num_threads()}, repeats {args.repeats} (median)")

    # What training did: logits on the device -> host numpy -> epic_metrics.
    tensors = [torch.from_numpy(a) for a in arrays]
    numpy_s, expected = median_seconds(
        lambda: epic_metrics(*(t.numpy() for t in tensors), **subsets), args.repeats)
    torch_s, on_cpu = median_seconds(lambda: epic_metrics_torch(*tensors, **subsets), args.repeats)
    print(f"cpu   numpy epic_metrics      {numpy_s:7.3f} s")
    print(f"cpu   torch epic_metrics_torch {torch_s:7.3f} s   numpy / torch = {numpy_s / torch_s:.2f}x   "
          f"identical metrics: {on_cpu == expected}")
    if args.gpu and torch.cuda.is_available():
        on_device = [t.cuda() for t in tensors]
        epic_metrics_torch(*on_device, **subsets)  # warm-up (kernels, allocator)

        # epic_metrics_torch returns after its final read, so no synchronize is needed around it.
        gpu_s, gpu_metrics = median_seconds(lambda: epic_metrics_torch(*on_device, **subsets), args.repeats)
        differing = {k: (expected[k], gpu_metrics[k]) for k in expected if gpu_metrics[k] != expected[k]}
        print(f"cuda  torch epic_metrics_torch {gpu_s:7.3f} s   numpy(cpu) / torch(cuda) = {numpy_s / gpu_s:.1f}x   "
              f"metrics differing from numpy: {differing or 'none'}")
    print(f"action@1 {expected['all_action_accuracy_at_1']:.2f}  action@5 {expected['all_action_accuracy_at_5']:.2f}")


if __name__ == "__main__":
    main()
