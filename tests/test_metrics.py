"""Official EPIC-100 metrics on hand-computed cases: top-k, ties, action scores, top_n cut, tail/unseen subsets."""
import math

import numpy as np
import pytest

from epicfeat.metrics import (
    MetricsError,
    action_scores,
    epic_metrics,
    most_confused,
    per_class_accuracy,
)


# ----------------------------------------------------------------------------------------------- top-k
def _verb_accuracy(verb_scores, verb_labels):
    """(all_verb_accuracy_at_1, _at_5) of verb scores, beside a one-class noun every segment gets right."""
    n = len(verb_labels)
    metrics = epic_metrics(verb_scores, np.zeros((n, 1)), np.array(verb_labels), np.zeros(n, dtype=np.int64))
    return metrics["all_verb_accuracy_at_1"], metrics["all_verb_accuracy_at_5"]


def test_topk_accuracy_small_hand_computed():
    scores = np.array([[0.1, 0.7, 0.2, 0.0, 0.0, 0.0],   # label 1 ranks 1st
                       [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 4 ranks 5th
                       [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 5 ranks 6th
                       [0.6, 0.1, 0.3, 0.0, 0.0, 0.0]])  # label 2 ranks 2nd
    assert _verb_accuracy(scores, [1, 4, 5, 2]) == (25.0, 75.0)
    assert _verb_accuracy(np.array([[0.1, 0.7, 0.2]]), [0]) == (0.0, 100.0)  # k above the class count: a hit


def test_topk_ties_rank_the_higher_class_index_first():
    # Stable reading of the official argsort()[:, ::-1]: among equal scores the higher class index ranks first.
    scores = np.array([[1.0, 1.0, 0.0],
                       [1.0, 1.0, 0.0],
                       [0.0, 0.0, 0.0]])
    assert _verb_accuracy(scores, [0, 0, 0])[0] == 0.0
    assert _verb_accuracy(scores, [1, 1, 2])[0] == 100.0  # all-equal row predicts class 2
    six_equal = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # class 0 ranks 6th, class 1 5th
    assert _verb_accuracy(six_equal, [0])[1] == 0.0 and _verb_accuracy(six_equal, [1])[1] == 100.0


def test_topk_refuses_nan_and_out_of_range_labels():
    with pytest.raises(MetricsError, match="NaN or infinite"):
        _verb_accuracy(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(MetricsError, match="label 2 of segment row 0 is outside 0..1"):
        _verb_accuracy(np.array([[0.0, 1.0]]), [2])


# ----------------------------------------------------------------------------------------------- action scores
# Probabilities with all 12 verb x noun products distinct, given as logits log(p) + a constant (softmax ignores it).
VERB_P = np.array([0.2, 0.5, 0.3])            # verb ranking 1, 2, 0
NOUN_P = np.array([0.15, 0.45, 0.05, 0.35])   # noun ranking 1, 3, 0, 2


def _logits(p, shift):
    return (np.log(p) + shift)[None, :]


def test_action_scores_outer_product_3x4_by_hand():
    ids, scores = action_scores(_logits(VERB_P, 3.0), _logits(NOUN_P, -1.0))
    # All 3 * 4 = 12 pairs (fewer than top_n = 100), sorted by p_verb * p_noun; id = verb * 1000 + noun.
    expected = [(1001, 0.5 * 0.45), (1003, 0.5 * 0.35), (2001, 0.3 * 0.45), (2003, 0.3 * 0.35),
                (1, 0.2 * 0.45), (1000, 0.5 * 0.15), (3, 0.2 * 0.35), (2000, 0.3 * 0.15),
                (0, 0.2 * 0.15), (1002, 0.5 * 0.05), (2002, 0.3 * 0.05), (2, 0.2 * 0.05)]
    assert ids.shape == scores.shape == (1, 12) and ids.dtype == np.int64
    assert ids[0].tolist() == [action for action, _ in expected]
    np.testing.assert_allclose(scores[0], [score for _, score in expected], rtol=1e-12)

    # top_n below the pair count (candidate shortcut path): the first 5 pairs of the same ranking.
    ids5, scores5 = action_scores(_logits(VERB_P, 3.0), _logits(NOUN_P, -1.0), top_n=5)
    assert ids5[0].tolist() == [action for action, _ in expected[:5]]
    np.testing.assert_allclose(scores5[0], [score for _, score in expected[:5]], rtol=1e-12)


def test_action_scores_top_n_excludes_verbs_outside_the_top_n_and_renormalises():
    ids, scores = action_scores(_logits(VERB_P, 0.0), _logits(NOUN_P, 0.0), top_n=2)
    # Only verbs 1 (0.5), 2 (0.3) and nouns 1 (0.45), 3 (0.35) take part; softmax over those two each:
    # verbs 0.625, 0.375; nouns 0.5625, 0.4375. Two pairs kept.
    assert ids[0].tolist() == [1001, 1003]
    np.testing.assert_allclose(scores[0], [0.625 * 0.5625, 0.625 * 0.4375], rtol=1e-12)
    assert not (ids // 1000 == 0).any()  # verb 0 (third best) can never appear, whatever its noun

    # So a segment whose true action is verb 0 + noun 1 (the 5th best pair with all verbs) is a miss at top_n=2.
    all_ids, _ = action_scores(_logits(VERB_P, 0.0), _logits(NOUN_P, 0.0), top_n=100)
    assert 1 in all_ids[0, :5] and 1 not in ids[0]


def test_action_scores_ties_follow_the_official_double_sort():
    # All verbs equal, all nouns equal: every pair scores 0.25. Verb and noun ranks: class 1 then class 0.
    # Matrix positions (verb-rank-major): 0=(v1,n1) 1=(v1,n0) 2=(v0,n1) 3=(v0,n0).
    # Official cut keeps the LAST equal positions (2, 3); the final re-sort lists them FIRST position first.
    ids, scores = action_scores(np.zeros((1, 2)), np.zeros((1, 2)), top_n=2)
    assert ids[0].tolist() == [1, 0]
    np.testing.assert_allclose(scores[0], [0.25, 0.25])
    # With every pair kept the final order is simply positions 0..3.
    ids, _ = action_scores(np.zeros((1, 2)), np.zeros((1, 2)), top_n=4)
    assert ids[0].tolist() == [1001, 1000, 1, 0]
    # 3 x 3 equal (9 pairs, top_n 3): the kept positions 6, 7, 8 lie outside the shortcut's candidate pairs.
    # Verb/noun ranks are 2, 1, 0, so position 6 = (verb rank 2 = class 0, noun rank 0 = class 2).
    ids, _ = action_scores(np.zeros((1, 3)), np.zeros((1, 3)), top_n=3)
    assert ids[0].tolist() == [2, 1, 0]


def _reference_action_ranking(verb_logits, noun_logits, top_n):
    """Slow, literal rule from the metrics docstring: Python sorts over every pair of one segment."""
    verb_order = sorted(range(len(verb_logits)), key=lambda c: (verb_logits[c], c), reverse=True)[:top_n]
    noun_order = sorted(range(len(noun_logits)), key=lambda c: (noun_logits[c], c), reverse=True)[:top_n]
    verb_p = np.exp(verb_logits[verb_order] - verb_logits[verb_order].max())
    noun_p = np.exp(noun_logits[noun_order] - noun_logits[noun_order].max())
    verb_p, noun_p = verb_p / verb_p.sum(), noun_p / noun_p.sum()
    pairs = [(verb_p[i] * noun_p[j], i * len(noun_order) + j, verb_order[i] * 1000 + noun_order[j])
             for i in range(len(verb_order)) for j in range(len(noun_order))]
    kept = sorted(pairs, key=lambda pair: (pair[0], pair[1]), reverse=True)[:top_n]  # cut: last position wins
    return [action for _, _, action in sorted(kept, key=lambda pair: (-pair[0], pair[1]))]  # first position first


@pytest.mark.parametrize("levels", [2, 4, None])  # few distinct logit values = many exact ties; None = random
def test_action_scores_match_the_literal_rule_on_random_tied_data(levels):
    rng = np.random.default_rng(levels or 7)
    shape_v, shape_n = (40, 12), (40, 130)  # nouns above 100: the top-100 noun cut matters
    if levels:
        verbs, nouns = rng.integers(0, levels, shape_v).astype(np.float64), rng.integers(0, levels, shape_n) * 1.0
    else:
        verbs, nouns = rng.normal(0, 2, shape_v), rng.normal(0, 2, shape_n)
    for top_n in (100, 7):
        ids, _ = action_scores(verbs, nouns, top_n=top_n)
        for row in range(len(verbs)):
            assert ids[row].tolist() == _reference_action_ranking(verbs[row], nouns[row], top_n)


def test_action_scores_keep_float32():
    ids, scores = action_scores(np.log(VERB_P)[None].astype(np.float32), np.log(NOUN_P)[None].astype(np.float32))
    assert scores.dtype == np.float32 and ids[0, 0] == 1001


# ----------------------------------------------------------------------------------------------- epic_metrics
def _ranked_logits(rankings, steps):
    """Logits whose class ranking per row is ``rankings[row]``, the k-th ranked class getting -k * step."""
    rankings = np.asarray(rankings)
    logits = np.zeros(rankings.shape)
    for row, ranking in enumerate(rankings):
        logits[row, ranking] = -np.arange(len(ranking)) * steps
    return logits


# Verb logit steps of 2.5, noun steps of 1: pair (verb rank a, noun rank b) scores exp(-2.5a - b), so the top-5
# actions are (0,0), (0,1), (0,2), (1,0), (0,3) -- all distinct.
VERB_RANKINGS = [[0, 1, 2], [1, 0, 2], [0, 2, 1], [2, 0, 1]]
NOUN_RANKINGS = [[0, 1, 2, 3], [3, 2, 0, 1], [3, 0, 1, 2], [0, 2, 3, 1]]
VERB_LABELS = np.array([0, 1, 2, 1])
NOUN_LABELS = np.array([0, 2, 3, 1])
# segment: verb label rank, noun label rank, action (verb rank, noun rank) -> action rank
# s0: 0, 0, (0,0) -> 1st     s1: 0, 1, (0,1) -> 2nd     s2: 1, 0, (1,0) -> 4th     s3: 2, 3, (2,3) -> beyond 5th


def test_epic_metrics_hand_computed_with_tail_and_unseen():
    verbs, nouns = _ranked_logits(VERB_RANKINGS, 2.5), _ranked_logits(NOUN_RANKINGS, 1.0)
    metrics = epic_metrics(verbs, nouns, VERB_LABELS, NOUN_LABELS, tail_verbs=frozenset({1}),
                           tail_nouns=[0], unseen=np.array([False, True, True, False]))
    assert metrics == {
        "all_verb_accuracy_at_1": 50.0, "all_verb_accuracy_at_5": 100.0,   # 3 verbs: top-5 always hits
        "all_noun_accuracy_at_1": 50.0, "all_noun_accuracy_at_5": 100.0,
        "all_action_accuracy_at_1": 25.0, "all_action_accuracy_at_5": 75.0,
        "tail_verb_accuracy_at_1": 50.0,                 # verb 1: s1 (hit), s3 (miss)
        "tail_noun_accuracy_at_1": 100.0,                # noun 0: s0 (hit)
        "tail_action_accuracy_at_1": pytest.approx(100 / 3),  # verb 1 OR noun 0: s0 (hit), s1, s3 (misses)
        "unseen_verb_accuracy_at_1": 50.0,               # s1 hit, s2 miss
        "unseen_noun_accuracy_at_1": 50.0,               # s1 miss, s2 hit
        "unseen_action_accuracy_at_1": 0.0,
    }
    assert list(metrics)[:6] == [f"all_{task}_accuracy_at_{k}" for task in ("verb", "noun", "action") for k in (1, 5)]


def test_epic_metrics_without_subsets_and_with_empty_subsets():
    verbs, nouns = _ranked_logits(VERB_RANKINGS, 2.5), _ranked_logits(NOUN_RANKINGS, 1.0)
    plain = epic_metrics(verbs, nouns, VERB_LABELS, NOUN_LABELS)
    assert set(plain) == {f"all_{task}_accuracy_at_{k}" for task in ("verb", "noun", "action") for k in (1, 5)}
    empty = epic_metrics(verbs, nouns, VERB_LABELS, NOUN_LABELS, tail_verbs=[], tail_nouns=set(),
                         unseen=np.zeros(4, dtype=bool))
    assert math.isnan(empty["tail_action_accuracy_at_1"]) and math.isnan(empty["unseen_verb_accuracy_at_1"])
    with pytest.raises(MetricsError, match="boolean mask of 4 segments"):
        epic_metrics(verbs, nouns, VERB_LABELS, NOUN_LABELS, unseen=np.array([0, 1, 1, 0]))


# ----------------------------------------------------------------------------------------------- diagnostics
def test_per_class_accuracy_with_an_absent_class():
    logits = np.array([[3.0, 1.0, 0.0, 0.0],   # predicts 0
                       [0.0, 2.0, 1.0, 0.0],   # predicts 1
                       [0.0, 1.0, 1.0, 0.0],   # tie 1/2 -> predicts 2 (higher index first)
                       [1.0, 0.0, 2.0, 0.0],   # predicts 2
                       [0.0, 0.0, 0.0, 0.0]])  # all equal -> predicts 3
    labels = np.array([0, 1, 1, 0, 2])  # class 3 never occurs
    accuracy = per_class_accuracy(logits, labels, n_classes=4)
    np.testing.assert_array_equal(accuracy[:3], [50.0, 50.0, 0.0])
    assert np.isnan(accuracy[3])


def test_most_confused_counts_top1_mistakes():
    logits = np.eye(3)[[1, 1, 2, 0, 1, 0]] * 5.0  # top-1 predictions 1, 1, 2, 0, 1, 0
    labels = np.array([0, 0, 0, 0, 2, 1])
    assert most_confused(logits, labels, ("take", "put", "open")) == [
        ("take", "put", 2), ("take", "open", 1), ("put", "take", 1), ("open", "put", 1)]
    assert most_confused(logits, labels, ("take", "put", "open"), top=1) == [("take", "put", 2)]
