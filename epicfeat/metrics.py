"""EPIC-KITCHENS-100 action recognition metrics, computed the way the official C1 evaluation computes them.

* Verb and noun top-k: a hit when the label is among the k best-scoring classes.
* Actions: per segment the top-100 verb and noun scores, softmaxed each (per segment; the official script
  softmaxes the whole batch, which ranks the same), their outer product, the top-100 pairs; id = verb * 1000 +
  noun. A segment whose true action is not among its kept pairs is a miss at every k.
* Subsets (top-1 only): tail verbs / nouns by the label's class, tail actions when verb OR noun is tail; unseen =
  segments of participants absent from training. Percent: ``mean(hits) * 100``.

Ties follow the stable reading of the official ``np.argsort(scores)[:, ::-1]``: among equal scores the HIGHER class
index ranks first. Actions are sorted twice there, so at the top-100 cut the equal-score pairs LAST in
verb-rank-major order (position ``verb_rank * n_kept_nouns + noun_rank``) are kept, and in the final list
equal-score pairs appear in verb-rank-major order.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from epicfeat.errors import EpicfeatError

ACTION_VERB_MULTIPLIER = 1000  # official action id = verb * 1000 + noun
_ROWS_PER_CHUNK = 256  # segments per chunk when a full outer-product matrix is needed (bounded memory)


class MetricsError(EpicfeatError):
    """Scores or labels that cannot be evaluated (wrong shape, NaN/inf, label out of range)."""


# ----------------------------------------------------------------------------------------------- validation
def _scores_2d(scores, name: str) -> np.ndarray:
    array = np.asarray(scores)
    if array.ndim != 2 or array.shape[1] == 0:
        raise MetricsError(f"{name}: expected a 2-D array (segments, classes), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)  # float16 exp/products lose too much precision to rank reliably
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise MetricsError(f"{name}: {len(rows)} segment(s) have NaN or infinite scores (first rows: "
                           f"{rows[:5].tolist()}). The model diverged or the results file is corrupt; "
                           f"re-run the evaluation with a finite checkpoint.")
    return array


def _labels_1d(labels, n_segments: int, n_classes: int, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (n_segments,):
        raise MetricsError(f"{name}: expected {n_segments} labels (one per segment), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise MetricsError(f"{name}: labels must be integer class ids, got dtype {array.dtype}.")
    out_of_range = (array < 0) | (array >= n_classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise MetricsError(f"{name}: label {int(array[first])} of segment row {first} is outside 0..{n_classes - 1}"
                           f" (the scores have {n_classes} classes). Scores and labels must use the same class table.")
    return array.astype(np.int64, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the logits' dtype (max-shifted so exp never overflows)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, C)
    return shifted / shifted.sum(axis=1, keepdims=True)


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Class indices by descending score; equal scores: higher class index first (stable reading of official)."""
    return np.argsort(scores, axis=1, kind="stable")[:, ::-1]  # (N, C)


def _label_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each segment's label (classes scoring higher + equal ones with a higher index), unsorted."""
    label_scores = scores[np.arange(len(labels)), labels][:, None]  # (N, 1)
    class_ids = np.arange(scores.shape[1])[None, :]  # (1, C)
    ahead = (scores > label_scores) | ((scores == label_scores) & (class_ids > labels[:, None]))  # (N, C)
    return ahead.sum(axis=1)  # (N,)


def _percent(hits: np.ndarray) -> float:
    """Official percentage: mean of the hits times 100; NaN for an empty subset (the official script errors)."""
    return float(hits.mean() * 100) if hits.size else float("nan")


# ----------------------------------------------------------------------------------------------- actions
def _candidate_pairs(n_verbs: int, n_nouns: int, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrix positions (verb_rank, noun_rank) with (verb_rank + 1) * (noun_rank + 1) <= top_n + 1.

    With sorted probabilities a pair dominated by more than top_n others cannot reach the top_n + 1 best, so
    these ~5 * top_n positions decide the top_n-th score and whether it is tied (instead of all top_n ** 2).
    """
    verb_rank, noun_rank = np.meshgrid(np.arange(n_verbs), np.arange(n_nouns), indexing="ij")  # (Cv, Cn) each
    inside = (verb_rank + 1) * (noun_rank + 1) <= top_n + 1
    return verb_rank[inside], noun_rank[inside]  # (M,), (M,) in verb-rank-major order


def _select_pairs_full(verb_probs: np.ndarray, noun_probs: np.ndarray, top_n: int) -> np.ndarray:
    """Flat matrix positions (B, top_n) of the kept pairs from the full outer product: every pair above the top_n-th
    score, then the equal-score pairs with the highest flat positions (exact for any ties)."""
    n_rows = len(verb_probs)
    products = (verb_probs[:, :, None] * noun_probs[:, None, :]).reshape(n_rows, -1)  # (B, Cv' * Cn')
    threshold = np.partition(products, -top_n, axis=1)[:, -top_n][:, None]  # (B, 1) top_n-th best score
    above = products > threshold
    equal = products == threshold
    still_needed = top_n - above.sum(axis=1, keepdims=True)  # (B, 1) how many equal pairs make the cut
    equal_at_or_after = np.cumsum(equal[:, ::-1], axis=1)[:, ::-1]  # (B, P) equal pairs at this position or later
    keep = above | (equal & (equal_at_or_after <= still_needed))
    return np.nonzero(keep)[1].reshape(n_rows, top_n)  # (B, top_n) ascending flat positions


def action_scores(verb_logits, noun_logits, *, top_n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Official EPIC-100 action ranking: (action ids (N, K) int64, scores (N, K)), best first, K = min(top_n,
    kept_verbs * kept_nouns). Pass logits (or log-probabilities), not probabilities, which a softmax flattens."""
    verb_logits = _scores_2d(verb_logits, "verb_logits")
    noun_logits = _scores_2d(noun_logits, "noun_logits")
    if len(verb_logits) != len(noun_logits):
        raise MetricsError(f"verb_logits has {len(verb_logits)} segments but noun_logits has {len(noun_logits)}.")
    if noun_logits.shape[1] > ACTION_VERB_MULTIPLIER:
        raise MetricsError(f"noun_logits has {noun_logits.shape[1]} classes; action ids verb * 1000 + noun need "
                           f"at most {ACTION_VERB_MULTIPLIER} nouns.")
    if top_n < 1:
        raise MetricsError(f"top_n must be at least 1, got {top_n}.")
    dtype = np.result_type(verb_logits.dtype, noun_logits.dtype)
    n_segments = len(verb_logits)

    verb_order = _descending_order(verb_logits)[:, :top_n]  # (N, Cv') class ids, best first
    noun_order = _descending_order(noun_logits)[:, :top_n]  # (N, Cn')
    rows = np.arange(n_segments)[:, None]  # (N, 1)
    verb_probs = _softmax(np.take_along_axis(verb_logits, verb_order, axis=1).astype(dtype, copy=False))  # (N, Cv')
    noun_probs = _softmax(np.take_along_axis(noun_logits, noun_order, axis=1).astype(dtype, copy=False))  # (N, Cn')
    kept_verbs, kept_nouns = verb_order.shape[1], noun_order.shape[1]
    n_pairs = min(top_n, kept_verbs * kept_nouns)

    if kept_verbs * kept_nouns <= top_n:
        # Every pair is kept: positions 0..P-1 for every segment.
        flat = np.broadcast_to(np.arange(n_pairs), (n_segments, n_pairs))  # (N, K)
    else:
        flat = np.empty((n_segments, n_pairs), dtype=np.int64)  # (N, K) kept flat positions per segment
        cand_verb, cand_noun = _candidate_pairs(kept_verbs, kept_nouns, top_n)
        cand_scores = verb_probs[:, cand_verb] * noun_probs[:, cand_noun]  # (N, M), M ~ 5 * top_n
        n_cand = len(cand_verb)
        threshold = np.partition(cand_scores, n_cand - n_pairs, axis=1)[:, n_cand - n_pairs][:, None]  # (N, 1)
        at_least = cand_scores >= threshold  # (N, M)
        # Sorted probabilities make the candidate shortcut exact; a tie at the cut needs the whole matrix.
        monotone = (np.diff(verb_probs, axis=1) <= 0).all(axis=1) & (np.diff(noun_probs, axis=1) <= 0).all(axis=1)
        clean = monotone & (at_least.sum(axis=1) == n_pairs)  # (N,)
        cand_flat = cand_verb * kept_nouns + cand_noun  # (M,)
        flat[clean] = cand_flat[np.nonzero(at_least[clean])[1]].reshape(-1, n_pairs)  # (Nc, K)
        for start in range(0, n_segments, _ROWS_PER_CHUNK):
            tied = np.flatnonzero(~clean[start:start + _ROWS_PER_CHUNK]) + start
            if len(tied):
                flat[tied] = _select_pairs_full(verb_probs[tied], noun_probs[tied], n_pairs)

    verb_rank, noun_rank = flat // kept_nouns, flat % kept_nouns  # (N, K) each
    scores = verb_probs[rows, verb_rank] * noun_probs[rows, noun_rank]  # (N, K)
    # Final order: score descending, equal scores by ascending flat position (the official double sort).
    order = np.lexsort((flat, -scores), axis=1)  # (N, K)
    verb_rank = np.take_along_axis(verb_rank, order, axis=1)
    noun_rank = np.take_along_axis(noun_rank, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    verb_ids = np.take_along_axis(verb_order, verb_rank, axis=1)  # (N, K) class ids
    noun_ids = np.take_along_axis(noun_order, noun_rank, axis=1)
    ids = verb_ids.astype(np.int64) * ACTION_VERB_MULTIPLIER + noun_ids
    return ids, scores


# ----------------------------------------------------------------------------------------------- all metrics
def _class_mask(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    return np.isin(labels, np.fromiter((int(c) for c in classes), dtype=np.int64))


def epic_metrics(verb_logits, noun_logits, verb_labels, noun_labels, *, tail_verbs: Iterable[int] | None = None,
                 tail_nouns: Iterable[int] | None = None, unseen=None) -> dict[str, float]:
    """The official EPIC-100 action recognition metrics, in percent, under their official names.

    Always ``all_{verb,noun,action}_accuracy_at_{1,5}``; ``tail_{verb,noun}_accuracy_at_1`` with ``tail_verbs`` /
    ``tail_nouns`` (class ids), ``tail_action_accuracy_at_1`` with both; ``unseen_{verb,noun,action}_accuracy_at_1``
    with ``unseen`` (bool mask (N,)). A subset with no segments gives NaN.
    """
    verb_logits = _scores_2d(verb_logits, "verb_logits")
    noun_logits = _scores_2d(noun_logits, "noun_logits")
    n_segments = len(verb_logits)
    verb_labels = _labels_1d(verb_labels, n_segments, verb_logits.shape[1], "verb_labels")
    noun_labels = _labels_1d(noun_labels, len(noun_logits), noun_logits.shape[1], "noun_labels")
    action_ids, _ = action_scores(verb_logits, noun_logits)
    action_labels = verb_labels * ACTION_VERB_MULTIPLIER + noun_labels  # (N,)

    # Hits at every k we report, per segment, so subsets are plain boolean indexing.
    verb_rank = _label_rank(verb_logits, verb_labels)  # (N,)
    noun_rank = _label_rank(noun_logits, noun_labels)
    action_match = action_ids == action_labels[:, None]  # (N, K)
    hits = {
        (task, k): hit
        for k in (1, 5)
        for task, hit in (("verb", verb_rank < k), ("noun", noun_rank < k),
                          ("action", action_match[:, :k].any(axis=1)))
    }
    metrics = {f"all_{task}_accuracy_at_{k}": _percent(hits[task, k])
               for task in ("verb", "noun", "action") for k in (1, 5)}

    tail_masks = {}
    if tail_verbs is not None:
        tail_masks["verb"] = _class_mask(verb_labels, tail_verbs)
    if tail_nouns is not None:
        tail_masks["noun"] = _class_mask(noun_labels, tail_nouns)
    if tail_verbs is not None and tail_nouns is not None:
        tail_masks["action"] = tail_masks["verb"] | tail_masks["noun"]
    for task, mask in tail_masks.items():
        metrics[f"tail_{task}_accuracy_at_1"] = _percent(hits[task, 1][mask])

    if unseen is not None:
        unseen = np.asarray(unseen)
        if unseen.shape != (n_segments,) or unseen.dtype != np.bool_:
            raise MetricsError(f"unseen: expected a boolean mask of {n_segments} segments, "
                               f"got shape {unseen.shape} dtype {unseen.dtype}.")
        for task in ("verb", "noun", "action"):
            metrics[f"unseen_{task}_accuracy_at_1"] = _percent(hits[task, 1][unseen])
    return metrics


# ----------------------------------------------------------------------------------------------- diagnostics
def per_class_accuracy(logits, labels, n_classes: int) -> np.ndarray:
    """Top-1 accuracy (percent) of each class over its segments: (n_classes,) float64, NaN for absent classes."""
    logits = _scores_2d(logits, "logits")
    if logits.shape[1] != n_classes:
        raise MetricsError(f"logits have {logits.shape[1]} classes but n_classes is {n_classes}.")
    labels = _labels_1d(labels, len(logits), n_classes, "labels")
    correct = (_label_rank(logits, labels) == 0).astype(np.float64)  # (N,)
    counts = np.bincount(labels, minlength=n_classes)  # (C,)
    hits = np.bincount(labels, weights=correct, minlength=n_classes)  # (C,)
    accuracy = np.full(n_classes, np.nan)
    present = counts > 0
    accuracy[present] = hits[present] / counts[present] * 100
    return accuracy


def most_confused(logits, labels, class_keys: Sequence[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The ``top`` most frequent (true class, top-1 predicted class) mistakes: [(true_key, predicted_key, count)],
    by count, then true id, then predicted id."""
    logits = _scores_2d(logits, "logits")
    n_classes = logits.shape[1]
    if len(class_keys) != n_classes:
        raise MetricsError(f"class_keys has {len(class_keys)} names but logits have {n_classes} classes.")
    labels = _labels_1d(labels, len(logits), n_classes, "labels")
    predicted = _descending_order(logits)[:, 0]  # (N,) top-1 with the official tie rule
    wrong = predicted != labels
    pair_ids = labels[wrong] * n_classes + predicted[wrong]  # (W,) one id per (true, predicted) pair
    pairs, counts = np.unique(pair_ids, return_counts=True)  # ascending pair id = (true, predicted) order
    order = np.argsort(-counts, kind="stable")[:top]  # by count, ties keep (true, predicted) order
    return [(class_keys[pairs[i] // n_classes], class_keys[pairs[i] % n_classes], int(counts[i])) for i in order]
