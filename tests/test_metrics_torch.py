"""epic_metrics_torch: the official EPIC-100 metrics on tensors, equal to the numpy path (hand-computed cases,
exact ties, random data) and checked inputs; on CUDA, no host synchronisation besides the final read."""
import math

import numpy as np
import pytest
import torch

from epicfeat.metrics import MetricsError, action_scores, epic_metrics
from epicfeat.metrics_torch import epic_metrics_torch, label_rank, true_action_rank
from tests.test_metrics import NOUN_LABELS, NOUN_RANKINGS, VERB_LABELS, VERB_RANKINGS


def _ranked_logits(rankings, step):
    """Logits whose k-th ranked class (``rankings[row][k]``) gets -k * step (tests/test_metrics.py's cases)."""
    rankings = np.asarray(rankings)  # (N, C)
    logits = np.zeros(rankings.shape)
    np.put_along_axis(logits, rankings, -np.arange(rankings.shape[1]) * step, axis=1)
    return logits


def _tensors(*arrays):
    return [torch.from_numpy(np.asarray(a)) for a in arrays]


def test_hand_computed_metrics_with_tail_and_unseen():
    verbs, nouns = _ranked_logits(VERB_RANKINGS, 2.5), _ranked_logits(NOUN_RANKINGS, 1.0)
    metrics = epic_metrics_torch(*_tensors(verbs, nouns, VERB_LABELS, NOUN_LABELS), tail_verbs=frozenset({1}),
                                 tail_nouns=[0], unseen=np.array([False, True, True, False]))
    # The hand-computed values of tests/test_metrics.py (see the table there), bit for bit as the numpy path.
    assert metrics == epic_metrics(verbs, nouns, VERB_LABELS, NOUN_LABELS, tail_verbs=frozenset({1}),
                                   tail_nouns=[0], unseen=np.array([False, True, True, False]))
    assert metrics == {
        "all_verb_accuracy_at_1": 50.0, "all_verb_accuracy_at_5": 100.0,
        "all_noun_accuracy_at_1": 50.0, "all_noun_accuracy_at_5": 100.0,
        "all_action_accuracy_at_1": 25.0, "all_action_accuracy_at_5": 75.0,
        "tail_verb_accuracy_at_1": 50.0, "tail_noun_accuracy_at_1": 100.0,
        "tail_action_accuracy_at_1": (1 / 3) * 100,  # mean of the hits, then * 100 (official), not 100 / 3
        "unseen_verb_accuracy_at_1": 50.0, "unseen_noun_accuracy_at_1": 50.0, "unseen_action_accuracy_at_1": 0.0,
    }


def test_empty_subsets_are_nan_and_no_subset_gives_the_six_all_metrics():
    verbs, nouns = _ranked_logits(VERB_RANKINGS, 2.5), _ranked_logits(NOUN_RANKINGS, 1.0)
    tensors = _tensors(verbs, nouns, VERB_LABELS, NOUN_LABELS)
    assert list(epic_metrics_torch(*tensors)) == [f"all_{t}_accuracy_at_{k}" for t in ("verb", "noun", "action")
                                                  for k in (1, 5)]
    empty = epic_metrics_torch(*tensors, tail_verbs=[], tail_nouns=set(), unseen=torch.zeros(4, dtype=torch.bool))
    assert math.isnan(empty["tail_action_accuracy_at_1"]) and math.isnan(empty["unseen_verb_accuracy_at_1"])


def _rank_in(ids: np.ndarray, verb_labels, noun_labels) -> np.ndarray:
    """Position of each true action in the numpy path's ranked action list (len(list) when absent)."""
    truth = np.asarray(verb_labels) * 1000 + np.asarray(noun_labels)
    return np.array([row.tolist().index(t) if t in row else len(row) for row, t in zip(ids, truth)])


def test_exact_ties_rank_the_true_action_as_the_official_double_sort():
    # All 9 pairs equal, top_n 3: the cut keeps positions 6, 7, 8 (two of them outside the candidate pairs), listed
    # 6, 7, 8 = actions 2, 1, 0 (tests/test_metrics.py). Every true action of the 3 x 3 grid, one per row.
    verb_labels, noun_labels = np.repeat(np.arange(3), 3), np.tile(np.arange(3), 3)
    zeros = torch.zeros(9, 3, dtype=torch.float64)
    ranks = true_action_rank(zeros, zeros, label_rank(zeros, torch.from_numpy(verb_labels)),
                             label_rank(zeros, torch.from_numpy(noun_labels)), top_n=3)
    # action 0 (v0,n0) rank 2, action 1 rank 1, action 2 rank 0; verbs 1 and 2 are cut (rank K = 3).
    assert ranks.tolist() == [2, 1, 0, 3, 3, 3, 3, 3, 3]
    ids, _ = action_scores(zeros.numpy(), zeros.numpy(), top_n=3)
    assert ranks.tolist() == _rank_in(ids, verb_labels, noun_labels).tolist()


@pytest.mark.parametrize("top_n", [100, 7, 3])
def test_tied_logits_rank_every_true_action_as_the_numpy_path(top_n):
    # Logit values with no coincidental sums (verb differences 1.3/1.6/2.9, noun 0.7/1.5/2.2): every tie is exact
    # (equal logits), so both paths see the same ties whatever their exp rounds to.
    rng = np.random.default_rng(top_n)
    verbs = rng.choice([0.0, 1.3, 2.9], (300, 12))
    nouns = rng.choice([0.0, 0.7, 2.2], (300, 130))  # above 100 nouns: the top-100 cut matters
    ids, _ = action_scores(verbs, nouns, top_n=top_n)
    # Labels: mostly actions that the numpy path lists (anywhere in its list), some random ones.
    listed = ids[np.arange(300), rng.integers(0, ids.shape[1], 300)]
    random_labels = rng.random(300) < 0.2
    verb_labels = np.where(random_labels, rng.integers(0, 12, 300), listed // 1000)
    noun_labels = np.where(random_labels, rng.integers(0, 130, 300), listed % 1000)
    v, n, lv, ln = _tensors(verbs, nouns, verb_labels, noun_labels)
    ranks = true_action_rank(v, n, label_rank(v, lv), label_rank(n, ln), top_n=top_n)
    expected = _rank_in(ids, verb_labels, noun_labels)
    assert ranks.tolist() == expected.tolist()
    assert (expected < ids.shape[1]).sum() > 200  # most true actions are listed: the ranks were really compared


def test_random_logits_give_the_numpy_metrics_exactly():
    rng = np.random.default_rng(0)
    n = 2000
    verbs = rng.normal(0, 3, (n, 97)).astype(np.float32)
    nouns = rng.normal(0, 3, (n, 300)).astype(np.float32)
    # Labels near the top so that action@1 / @5 are far from 0 (a metric of 0 vs 0 would compare nothing).
    verb_labels = np.where(rng.random(n) < 0.6, verbs.argmax(1), rng.integers(0, 97, n))
    noun_labels = np.where(rng.random(n) < 0.6, nouns.argmax(1), rng.integers(0, 300, n))
    subsets = dict(tail_verbs=range(50, 97), tail_nouns=range(100, 300), unseen=rng.random(n) < 0.1)
    expected = epic_metrics(verbs, nouns, verb_labels, noun_labels, **subsets)
    assert epic_metrics_torch(*_tensors(verbs, nouns, verb_labels, noun_labels), **subsets) == expected
    assert expected["all_action_accuracy_at_1"] > 20


def test_half_precision_logits_are_ranked_in_float32_as_numpy_does():
    rng = np.random.default_rng(3)
    verbs = rng.normal(0, 3, (200, 20)).astype(np.float16)
    nouns = rng.normal(0, 3, (200, 40)).astype(np.float16)
    labels_v, labels_n = verbs.argmax(1), rng.integers(0, 40, 200)
    expected = epic_metrics(verbs, nouns, labels_v, labels_n)
    assert epic_metrics_torch(*_tensors(verbs, nouns, labels_v, labels_n)) == expected


def test_bad_inputs_raise_the_numpy_paths_errors():
    verbs, nouns = _ranked_logits(VERB_RANKINGS, 2.5), _ranked_logits(NOUN_RANKINGS, 1.0)
    nan_nouns = nouns.copy()
    nan_nouns[2, 1] = np.nan
    with pytest.raises(MetricsError, match=r"noun_logits: 1 segment\(s\) have NaN or infinite scores \(first "
                                           r"rows: \[2\]"):
        epic_metrics_torch(*_tensors(verbs, nan_nouns, VERB_LABELS, NOUN_LABELS))
    huge = np.full((4, 3), 3e38, dtype=np.float32)  # finite, but each row's sum overflows float32
    huge[np.arange(4), VERB_LABELS] = 3.3e38
    assert epic_metrics_torch(*_tensors(huge, nouns, VERB_LABELS, NOUN_LABELS))["all_verb_accuracy_at_1"] == 100.0
    with pytest.raises(MetricsError, match="verb_labels: label 3 of segment row 1 is outside 0..2"):
        epic_metrics_torch(*_tensors(verbs, nouns, np.array([0, 3, 2, 1]), NOUN_LABELS))
    with pytest.raises(MetricsError, match="boolean mask of 4 segments"):
        epic_metrics_torch(*_tensors(verbs, nouns, VERB_LABELS, NOUN_LABELS), unseen=np.array([0, 1, 1, 0]))
    with pytest.raises(MetricsError, match="labels must be integer class ids"):
        epic_metrics_torch(*_tensors(verbs, nouns, VERB_LABELS * 1.0, NOUN_LABELS))
    with pytest.raises(MetricsError, match="expected 4 labels"):
        epic_metrics_torch(*_tensors(verbs, nouns, VERB_LABELS[:3], NOUN_LABELS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_equal_to_cpu_and_only_the_final_read_synchronises():
    rng = np.random.default_rng(1)
    verbs, nouns = rng.normal(0, 3, (9668, 97)).astype(np.float32), rng.normal(0, 3, (9668, 300)).astype(np.float32)
    verb_labels, noun_labels = verbs.argmax(1), rng.integers(0, 300, 9668)
    subsets = dict(tail_verbs=range(50, 97), tail_nouns=range(100, 300), unseen=rng.random(9668) < 0.1)
    on_cpu = epic_metrics_torch(*_tensors(verbs, nouns, verb_labels, noun_labels), **subsets)
    on_gpu = [t.cuda() for t in _tensors(verbs, nouns, verb_labels, noun_labels)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as synced:
            metrics = epic_metrics_torch(*on_gpu, **subsets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The undecided-rows lookup (nonzero) and the final tolist: two synchronisations for all the metrics.
    assert len(synced) <= 2, [str(w.message) for w in synced]
    assert metrics.keys() == on_cpu.keys()
    assert all(abs(metrics[k] - on_cpu[k]) <= 0.011 for k in metrics)  # CUDA's exp may round a near-tie apart
