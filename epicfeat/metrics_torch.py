"""The official EPIC-100 metrics of ``epicfeat.metrics.epic_metrics``, computed with torch where the logits are.

Training validates every epoch; with numpy, a GPU run copies 9,668 x (97 + 300) logits to the host and ranks them on
the CPU (0.3 s on an idle 2-core CPU, benchmarks/bench_metrics.py) while the GPU waits. ``epic_metrics_torch`` takes the logits and labels on any device (CPU or GPU) and returns the
same dict, with two host synchronisations for all metrics together: the lookup of the rare rows that need every
pair (``true_action_rank``) and the final ``tolist``.

The ranking rules are those of ``epicfeat.metrics`` (read its docstring: ties, top-100 cut, double sort). Instead of
building each segment's ranked list of 100 actions, this module computes where the TRUE action lands in it, which
needs only comparisons with the outer product's pairs (no sort; the ~5 * K candidate pairs of
``epicfeat.metrics.candidate_pairs`` decide all but rows with a tie at the cut):

* verb/noun rank of the label: classes scoring higher + equal-scoring classes with a higher index;
* the true pair (verb rank a, noun rank b) sits at matrix position f = a * kept_nouns + b with score s. With
  A pairs scoring above s, E_after equal pairs at positions after f and E_before before f, the official cut (ties:
  later positions kept first) keeps it when A + E_after < K, and the final re-sort (ties: earlier positions
  first) puts it at rank A + min(E_before, K - 1 - A - E_after): the equal pairs before it that made the cut.

Values equal the numpy path's exactly whenever both compute the same softmax probabilities. torch's and numpy's
float32 ``exp`` differ in the last bit for some inputs, so two pairs whose products are within one rounding step
(different logits, not exact ties) can swap; exact ties (equal logits) rank the same in both.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from epicfeat.metrics import ACTION_VERB_MULTIPLIER, MetricsError, candidate_pairs

__all__ = ["epic_metrics_torch"]

#: Outer-product entries per chunk of segments (float32: 64 MiB per temporary), so memory stays bounded.
_PAIRS_PER_CHUNK = 1 << 24
_TASKS = ("verb", "noun", "action")


def epic_metrics_torch(
    verb_logits: torch.Tensor,
    noun_logits: torch.Tensor,
    verb_labels: torch.Tensor,
    noun_labels: torch.Tensor,
    *,
    tail_verbs: Iterable[int] | None = None,
    tail_nouns: Iterable[int] | None = None,
    unseen: torch.Tensor | np.ndarray | None = None,
    top_n: int = 100,
) -> dict[str, float]:
    """``epicfeat.metrics.epic_metrics`` on tensors: the same names, subsets and values (percent, NaN for an empty
    subset), computed on the logits' device with two host synchronisations (not one per metric or per batch).

    verb_logits (N, Cv), noun_logits (N, Cn) float; labels (N,) integer, moved to the logits' device if elsewhere;
    ``unseen`` a bool mask (N,) (tensor or numpy). NaN/inf scores and out-of-range labels raise ``MetricsError``
    (checked together with the metrics, after the final synchronisation).
    """
    verb_logits, noun_logits = _float_scores(verb_logits, "verb_logits"), _float_scores(noun_logits, "noun_logits")
    n_segments, device = len(verb_logits), verb_logits.device
    if len(noun_logits) != n_segments:
        raise MetricsError(f"verb_logits has {n_segments} segments but noun_logits has {len(noun_logits)}.")
    if noun_logits.shape[1] > ACTION_VERB_MULTIPLIER:
        raise MetricsError(f"noun_logits has {noun_logits.shape[1]} classes; action ids verb * 1000 + noun need "
                           f"at most {ACTION_VERB_MULTIPLIER} nouns.")
    verb_labels = _int_labels(verb_labels, n_segments, device, "verb_labels")
    noun_labels = _int_labels(noun_labels, n_segments, device, "noun_labels")
    dtype = torch.promote_types(verb_logits.dtype, noun_logits.dtype)  # the numpy path's result_type
    verb_logits, noun_logits = verb_logits.to(dtype), noun_logits.to(dtype)

    # Ranked with clamped labels so that a bad label cannot index out of bounds before the check reports it.
    verb_rank = label_rank(verb_logits, verb_labels.clamp(0, verb_logits.shape[1] - 1))  # (N,)
    noun_rank = label_rank(noun_logits, noun_labels.clamp(0, noun_logits.shape[1] - 1))
    action_rank = true_action_rank(verb_logits, noun_logits, verb_rank, noun_rank, top_n=top_n)  # (N,)
    ranks = {"verb": verb_rank, "noun": noun_rank, "action": action_rank}

    everyone = torch.ones(n_segments, dtype=torch.bool, device=device)
    subsets = {f"all_{task}_accuracy_at_{k}": (ranks[task] < k, everyone) for task in _TASKS for k in (1, 5)}
    for task, mask in _subset_masks(verb_labels, noun_labels, tail_verbs, tail_nouns, unseen, n_segments).items():
        subsets[task] = (ranks[task.split("_")[1]] < 1, mask)
    hits = torch.stack([(hit & mask).sum() for hit, mask in subsets.values()]).double()  # (M,)
    counts = torch.stack([mask.sum() for _, mask in subsets.values()]).double()  # (M,)
    checks = torch.stack([
        _bad_rows(verb_logits), _bad_rows(noun_logits),
        _out_of_range(verb_labels, verb_logits.shape[1]), _out_of_range(noun_labels, noun_logits.shape[1]),
    ]).double()  # (4,)
    values = torch.cat([hits / counts * 100, checks]).tolist()  # the one host synchronisation
    _raise_on_bad_input(values[len(subsets):], verb_logits, noun_logits, verb_labels, noun_labels)
    return dict(zip(subsets, values[:len(subsets)]))


def label_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank (N,) of each label: classes scoring higher + equal-scoring classes with a higher index."""
    label_scores = scores.gather(1, labels[:, None])  # (N, 1)
    class_ids = torch.arange(scores.shape[1], device=scores.device)[None, :]  # (1, C)
    ahead = (scores > label_scores) | ((scores == label_scores) & (class_ids > labels[:, None]))  # (N, C)
    return ahead.sum(dim=1)  # (N,)


def true_action_rank(
    verb_logits: torch.Tensor, noun_logits: torch.Tensor, verb_rank: torch.Tensor, noun_rank: torch.Tensor,
    *, top_n: int = 100,
) -> torch.Tensor:
    """Rank (N,) of each segment's true action in the official top-K action list; K (never a hit) when cut.

    ``verb_rank`` / ``noun_rank``: the labels' ranks (``label_rank``). Decided from the ~5 * K candidate pairs
    of ``epicfeat.metrics`` (no pair outside them can score at least a kept pair's score unless K + 1 candidates
    do); rows where that leaves a tie at the cut open, or whose probabilities are not sorted, use every pair.
    """
    if top_n < 1:
        raise MetricsError(f"top_n must be at least 1, got {top_n}.")
    kept_verbs, kept_nouns = min(top_n, verb_logits.shape[1]), min(top_n, noun_logits.shape[1])
    n_pairs = min(top_n, kept_verbs * kept_nouns)
    verb_probs = _sorted_softmax(verb_logits, kept_verbs)  # (N, Cv') descending
    noun_probs = _sorted_softmax(noun_logits, kept_nouns)  # (N, Cn')
    listed = (verb_rank < kept_verbs) & (noun_rank < kept_nouns)  # (N,) both among the kept classes
    verb_rank, noun_rank = verb_rank.clamp(max=kept_verbs - 1), noun_rank.clamp(max=kept_nouns - 1)
    true_score = verb_probs.gather(1, verb_rank[:, None]) * noun_probs.gather(1, noun_rank[:, None])  # (N, 1)
    true_position = (verb_rank * kept_nouns + noun_rank)[:, None]  # (N, 1) verb-rank-major position

    # Candidates: every pair that can score at least the K-th best (epicfeat.metrics.candidate_pairs).
    device = verb_logits.device
    cand_verb, cand_noun = (torch.from_numpy(positions).to(device, non_blocking=True)  # (M,) each; no stream sync
                            for positions in candidate_pairs(kept_verbs, kept_nouns, top_n))
    cand_scores = verb_probs[:, cand_verb] * noun_probs[:, cand_noun]  # (N, M), the same products as all pairs
    above = (cand_scores > true_score).sum(dim=1)  # (N,)
    at_least = (cand_scores >= true_score).sum(dim=1)  # (N,) the true pair included when it is a candidate
    equal_after = ((cand_scores == true_score) & (cand_verb * kept_nouns + cand_noun > true_position)).sum(dim=1)
    candidate = (verb_rank + 1) * (noun_rank + 1) <= top_n + 1  # (N,)
    kept = candidate & (at_least <= n_pairs)  # every pair scoring >= the true one is a candidate: exact counts
    cut = above >= n_pairs  # K pairs score higher: cut, whatever the ties
    # Before the pair in the final list: the higher pairs and the equal ones at earlier positions.
    rank = torch.where(kept, at_least - 1 - equal_after, n_pairs)  # (N,)

    sorted_probs = _is_descending(verb_probs) & _is_descending(noun_probs)  # (N,) exp/division kept the order
    undecided = torch.nonzero(~sorted_probs | ~(kept | cut)).flatten()  # (U,) host sync; ties at the cut: rare
    if len(undecided):
        rank[undecided] = _rank_among_all_pairs(verb_probs[undecided], noun_probs[undecided],
                                                true_score[undecided], true_position[undecided], n_pairs)
    return torch.where(listed, rank, n_pairs)


def _rank_among_all_pairs(verb_probs, noun_probs, true_score, true_position, n_pairs: int) -> torch.Tensor:
    """``true_action_rank`` from the whole outer product (exact for any ties), in chunks of bounded memory."""
    positions = torch.arange(verb_probs.shape[1] * noun_probs.shape[1], device=verb_probs.device)  # (P,)
    ranks = []
    rows_per_chunk = max(1, _PAIRS_PER_CHUNK // len(positions))
    for begin in range(0, len(verb_probs), rows_per_chunk):
        rows = slice(begin, begin + rows_per_chunk)
        products = (verb_probs[rows, :, None] * noun_probs[rows, None, :]).flatten(1)  # (B, Cv' * Cn')
        score, position = true_score[rows], true_position[rows]  # (B, 1), (B, 1)
        above = (products > score).sum(dim=1)  # (B,)
        equal = products == score  # (B, P)
        equal_after = (equal & (positions > position)).sum(dim=1)  # (B,)
        equal_before = (equal & (positions < position)).sum(dim=1)  # (B,)
        room = n_pairs - 1 - above - equal_after  # (B,) places left after the pair at the cut; < 0: cut off
        ranks.append(torch.where(room >= 0, above + torch.minimum(equal_before, room), n_pairs))
    return torch.cat(ranks)


def _is_descending(probs: torch.Tensor) -> torch.Tensor:
    return (probs[:, 1:] <= probs[:, :-1]).all(dim=1)  # (N,)


def _sorted_softmax(logits: torch.Tensor, kept: int) -> torch.Tensor:
    """Softmax (N, kept) over each row's ``kept`` highest logits, best first, as the numpy path computes it."""
    if kept == logits.shape[1]:  # all classes: a sort is 3x faster than topk on CPUs
        top = logits.sort(dim=1, descending=True).values  # (N, kept)
    else:
        top = logits.topk(kept, dim=1, sorted=True).values  # (N, kept) descending; values are tie-order free
    shifted = torch.exp(top - top[:, :1])  # max-shifted: exp never overflows
    return shifted / shifted.sum(dim=1, keepdim=True)


def _subset_masks(verb_labels, noun_labels, tail_verbs, tail_nouns, unseen, n_segments) -> dict[str, torch.Tensor]:
    """The segments of each subset metric: tail verbs / nouns / actions (verb OR noun tail) and unseen."""
    masks = {}
    if tail_verbs is not None:
        masks["tail_verb_accuracy_at_1"] = _in_classes(verb_labels, tail_verbs)
    if tail_nouns is not None:
        masks["tail_noun_accuracy_at_1"] = _in_classes(noun_labels, tail_nouns)
    if tail_verbs is not None and tail_nouns is not None:
        masks["tail_action_accuracy_at_1"] = masks["tail_verb_accuracy_at_1"] | masks["tail_noun_accuracy_at_1"]
    if unseen is not None:
        unseen = torch.as_tensor(unseen)
        if tuple(unseen.shape) != (n_segments,) or unseen.dtype != torch.bool:
            raise MetricsError(f"unseen: expected a boolean mask of {n_segments} segments, "
                               f"got shape {tuple(unseen.shape)} dtype {unseen.dtype}.")
        unseen = unseen.to(verb_labels.device, non_blocking=True)
        for task in _TASKS:
            masks[f"unseen_{task}_accuracy_at_1"] = unseen
    return masks


def _in_classes(labels: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """(N,) bool: the label is one of ``classes`` (a host-built lookup table, copied without a sync)."""
    ids = torch.tensor([int(c) for c in classes], dtype=torch.int64)  # (K,)
    table = torch.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=torch.bool)  # (C',) True: a listed class
    table[ids] = True
    table = table.to(labels.device, non_blocking=True)
    return table[labels.clamp(0, len(table) - 1)] & (labels < len(table))  # (N,)


def _float_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise MetricsError(f"{name}: expected a 2-D array (segments, classes), got shape {tuple(scores.shape)}.")
    if not scores.is_floating_point():
        return scores.double()  # as numpy's float64 for integer scores
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float()  # half-precision exp/products lose too much precision to rank reliably
    return scores


def _int_labels(labels, n_segments: int, device: torch.device, name: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if tuple(labels.shape) != (n_segments,):
        raise MetricsError(f"{name}: expected {n_segments} labels (one per segment), got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise MetricsError(f"{name}: labels must be integer class ids, got dtype {labels.dtype}.")
    return labels.to(device, torch.int64, non_blocking=True)


def _bad_rows(scores: torch.Tensor) -> torch.Tensor:
    """Rows whose sum is not finite: every row with a NaN/inf, and (rarely) one that overflows, which
    ``_raise_on_bad_input`` then clears with the exact per-element test (5x cheaper than it on a CPU)."""
    return (~torch.isfinite(scores.sum(dim=1))).sum()


def _out_of_range(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return ((labels < 0) | (labels >= n_classes)).sum()


def _raise_on_bad_input(checks: list[float], verb_logits, noun_logits, verb_labels, noun_labels) -> None:
    """The numpy path's messages, built only when a check failed (the extra reads happen on the error path)."""
    bad_verbs, bad_nouns, verbs_out, nouns_out = checks
    for count, name, scores in ((bad_verbs, "verb_logits", verb_logits), (bad_nouns, "noun_logits", noun_logits)):
        bad = torch.nonzero(~torch.isfinite(scores).all(dim=1)).flatten() if count else []  # (B,)
        if len(bad):
            rows = bad[:5].tolist()
            raise MetricsError(f"{name}: {len(bad)} segment(s) have NaN or infinite scores (first rows: {rows}). "
                               "The model diverged or the results file is corrupt; re-run the evaluation with a "
                               "finite checkpoint.")
    for count, name, labels, n_classes in ((verbs_out, "verb_labels", verb_labels, verb_logits.shape[1]),
                                           (nouns_out, "noun_labels", noun_labels, noun_logits.shape[1])):
        if count:
            first = int(torch.nonzero((labels < 0) | (labels >= n_classes))[0])
            raise MetricsError(f"{name}: label {int(labels[first])} of segment row {first} is outside "
                               f"0..{n_classes - 1} (the scores have {n_classes} classes). Scores and labels must "
                               "use the same class table.")
