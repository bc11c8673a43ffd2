"""Results pickle and leaderboard zip formats, every refusal (nothing written), and ensembles."""
import json
import pickle
import zipfile

import numpy as np
import pytest

from epicfeat.errors import EpicfeatError
from epicfeat.metrics import action_scores
from epicfeat.submission import (
    EnsembleError,
    SubmissionError,
    build_submission,
    ensemble,
    log_softmax_rows,
    write_results_pickle,
    write_submission_zip,
)
from epicfeat.submission import _shortest_float32  # noqa: PLC2701 - the decimal writer, tested on its own

IDS = ["P01_101_0", "P01_101_1"]
VERBS = np.array([[0.5, -1.25, 3.1], [2.0, 0.0, -7.5]], dtype=np.float32)  # (2 segments, 3 verbs)
NOUNS = np.array([[2.0, -0.1], [0.25, 1e-3]], dtype=np.float32)            # (2 segments, 2 nouns)
SLS = {"sls_pt": 1, "sls_tl": 3, "sls_td": 3}


def _build(verbs=VERBS, nouns=NOUNS, ids=IDS, expected=IDS, n_verbs=3, n_nouns=2, **sls):
    return build_submission(verbs, nouns, ids, expected_ids=expected, n_verbs=n_verbs, n_nouns=n_nouns,
                            sls={**SLS, **sls})


# ----------------------------------------------------------------------------------------------- results pickle
def test_results_pickle_has_the_official_dict_layout(tmp_path):
    path = write_results_pickle(tmp_path / "results.pkl", VERBS.astype(np.float64), NOUNS, IDS)
    with open(path, "rb") as f:
        results = pickle.load(f)
    assert sorted(results) == ["narration_id", "noun_output", "verb_output"]
    assert results["verb_output"].dtype == np.float32 and results["verb_output"].shape == (2, 3)
    assert results["noun_output"].dtype == np.float32 and results["noun_output"].shape == (2, 2)
    assert isinstance(results["narration_id"], np.ndarray) and results["narration_id"].dtype.kind == "U"
    assert results["narration_id"].tolist() == IDS
    # Per-row log-probabilities of the logits, by hand: x - log(sum(exp(x))) in float64, then float32.
    by_hand = VERBS.astype(np.float64) - np.log(np.exp(VERBS.astype(np.float64)).sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(results["verb_output"], by_hand.astype(np.float32))
    np.testing.assert_array_equal(results["noun_output"], log_softmax_rows(NOUNS))
    assert results["verb_output"][0].argmax() == 2 and results["noun_output"][1].argmax() == 0  # same ranking
    assert [p.name for p in tmp_path.iterdir()] == ["results.pkl"]  # no temporary file left


@pytest.mark.parametrize("verbs, nouns, ids, message", [
    (VERBS, NOUNS, IDS[:1], "2 verb rows, 2 noun rows and 1 narration_ids"),
    (VERBS, NOUNS, [IDS[0], IDS[0]], "repeated: P01_101_0"),
    (np.where(np.eye(2, 3, k=1) > 0, np.nan, VERBS), NOUNS, IDS, "NaN or infinite scores .* for P01_101_0, P01_101_1"),
    (VERBS, np.array([[np.inf, 0.0], [0.0, 0.0]]), IDS, "NaN or infinite scores .* for P01_101_0"),
])
def test_results_pickle_refusals_write_nothing(tmp_path, verbs, nouns, ids, message):
    with pytest.raises(SubmissionError, match=message):
        write_results_pickle(tmp_path / "results.pkl", verbs, nouns, ids)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- submission zip
def test_submission_zip_holds_exactly_the_official_json(tmp_path):
    # Scores given in the opposite order to expected_ids: results follow the split's order.
    submission = _build(verbs=VERBS[::-1], nouns=NOUNS[::-1], ids=IDS[::-1])
    path = write_submission_zip(tmp_path / "submission.zip", submission)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["test.json"]
        assert archive.getinfo("test.json").compress_type == zipfile.ZIP_DEFLATED
        text = archive.read("test.json").decode()
    verbs = _shortest_float32(log_softmax_rows(VERBS)).tolist()  # (2, 3) the float32 values as short decimals
    nouns = _shortest_float32(log_softmax_rows(NOUNS)).tolist()  # (2, 2)
    assert json.loads(text) == {
        "version": "0.2", "challenge": "action_recognition", "sls_pt": 1, "sls_tl": 3, "sls_td": 3,
        "results": {
            "P01_101_0": {"verb": dict(zip("012", verbs[0])), "noun": dict(zip("01", nouns[0]))},
            "P01_101_1": {"verb": dict(zip("012", verbs[1])), "noun": dict(zip("01", nouns[1]))},
        },
    }
    assert list(json.loads(text)["results"]) == IDS
    # float32 scores are written as their shortest exact decimals (-0.08358756 for log p(verb 2 | segment 0),
    # not -0.08358756452798843).
    assert '"2":-0.08358756}' in text and float(np.float32(-0.08358756)) == float(log_softmax_rows(VERBS)[0, 2])
    assert [p.name for p in tmp_path.iterdir()] == ["submission.zip"]


def test_submission_scores_read_back_as_the_same_float32_values():
    # Neighbouring float32 values that 6 significant digits would merge into one (a new tie) stay distinct.
    close = np.array([1.0, np.nextafter(np.float32(1), np.float32(2)), 0.123456789, -3.3e-9], dtype=np.float32)
    decimals = json.loads(json.dumps(_shortest_float32(close).tolist()))
    np.testing.assert_array_equal(np.array(decimals, dtype=np.float32), close)
    assert decimals[0] != decimals[1]
    logits = np.array([[3.0, 1.0, 0.123456789, -3.3e-9, 7.25]], dtype=np.float32)
    submission = _build(verbs=logits[:, :3], nouns=logits[:, 3:], ids=IDS[:1], expected=IDS[:1])
    results = json.loads(json.dumps(submission))["results"]["P01_101_0"]
    verbs = np.array([results["verb"][str(c)] for c in range(3)], dtype=np.float32)
    nouns = np.array([results["noun"][str(c)] for c in range(2)], dtype=np.float32)
    np.testing.assert_array_equal(verbs, log_softmax_rows(logits[:, :3])[0])
    np.testing.assert_array_equal(nouns, log_softmax_rows(logits[:, 3:])[0])
    assert all(type(value) is float for value in submission["results"]["P01_101_0"]["verb"].values())


@pytest.mark.parametrize("changes, message", [
    ({"ids": IDS[:1], "verbs": VERBS[:1], "nouns": NOUNS[:1]},
     "1 narration_id\\(s\\) of the split have no scores: P01_101_1"),
    ({"ids": [IDS[0], IDS[0]]}, "scored more than once: P01_101_0.*no scores: P01_101_1"),
    ({"ids": [IDS[0], "P99_999_9"]}, "not in the split: P99_999_9"),
    ({"expected": IDS + IDS[:1]}, "the expected split lists narration_id\\(s\\) more than once: P01_101_0"),
    ({"verbs": np.where(np.eye(2, 3) > 0, np.nan, VERBS)}, "NaN or infinite scores for P01_101_0, P01_101_1"),
    ({"nouns": np.array([[0.0, 0.0], [0.0, -np.inf]])}, "NaN or infinite scores for P01_101_1"),
    ({"n_verbs": 97}, "verb scores have 3 classes but the verb class table has 97"),
    ({"n_nouns": 300}, "noun scores have 2 classes but the noun class table has 300"),
    ({"ids": IDS + ["P01_101_2"]}, "2 verb rows, 2 noun rows and 3 narration_ids"),
    ({"sls_pt": 6}, "sls_pt must be an integer supervision level from 0 to 5, got 6"),
    ({"sls_tl": -1}, "sls_tl must be .* got -1"),
    ({"sls_td": 3.0}, "sls_td must be .* got 3.0"),
    ({"sls_td": True}, "sls_td must be .* got True"),
])
def test_build_submission_refusals(changes, message):
    with pytest.raises(SubmissionError, match=message):
        _build(**changes)


def test_write_submission_zip_refuses_a_broken_submission_and_leaves_nothing(tmp_path):
    good = _build()
    target = tmp_path / "submission.zip"
    write_submission_zip(target, good)
    before = target.read_bytes()
    broken_cases = [
        {**good, "version": "0.1"},
        {**good, "sls_td": 9},
        {**good, "results": {}},
        {**good, "results": {**good["results"], "P01_101_1": {"verb": {"0": float("nan")}, "noun": {}}}},
    ]
    for broken in broken_cases:
        with pytest.raises(SubmissionError):
            write_submission_zip(target, broken)
        with pytest.raises(SubmissionError):
            write_submission_zip(tmp_path / "new.zip", broken)
    assert target.read_bytes() == before  # the earlier good file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["submission.zip"]  # no new zip, no temporary file


def test_a_crash_while_writing_leaves_no_partial_zip(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail)
    with pytest.raises(OSError, match="disk full"):
        write_submission_zip(tmp_path / "submission.zip", _build())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- ensembles
A_VERB_P, A_NOUN_P = np.array([[0.5, 0.25, 0.25]]), np.array([[0.9, 0.1]])
B_VERB_P, B_NOUN_P = np.array([[0.1, 0.6, 0.3]]), np.array([[0.3, 0.7]])


def test_ensemble_of_probabilities_equals_the_hand_averaged_probabilities():
    # Members as logits = log(p) + arbitrary shifts; weights 1 and 3 normalise to 0.25 and 0.75.
    members = [(np.log(A_VERB_P) + 4.0, np.log(A_NOUN_P) - 2.0), (np.log(B_VERB_P), np.log(B_NOUN_P) + 1.0)]
    verb, noun = ensemble(members, [1.0, 3.0])
    assert verb.dtype == np.float32 and verb.shape == (1, 3) and noun.shape == (1, 2)
    # 0.25 * A + 0.75 * B, by hand
    np.testing.assert_allclose(np.exp(verb), [[0.2, 0.5125, 0.2875]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(noun), [[0.45, 0.55]], rtol=1e-6)
    # Log-probabilities keep action scoring sane: its softmax gives the averaged probabilities back, so the
    # action scores are products of the ensemble's probabilities (best pair: verb 1 x noun 1).
    ids, scores = action_scores(verb, noun)
    assert ids[0, 0] == 1001
    np.testing.assert_allclose(scores[0, 0], 0.5125 * 0.55, rtol=1e-5)


def test_ensemble_of_logits_is_the_weighted_mean():
    members = [(np.array([[1.0, 2.0, 3.0]]), np.array([[0.0, 4.0]])),
               (np.array([[3.0, 2.0, -1.0]]), np.array([[2.0, 0.0]]))]
    verb, noun = ensemble(members, [3.0, 1.0], mode="logits")
    np.testing.assert_allclose(verb, [[1.5, 2.0, 2.0]])
    np.testing.assert_allclose(noun, [[0.5, 3.0]])
    equal_verb, _ = ensemble(members, None, mode="logits")
    np.testing.assert_allclose(equal_verb, [[2.0, 2.0, 1.0]])


@pytest.mark.parametrize("members, weights, mode, message", [
    ([(A_VERB_P, A_NOUN_P), (B_VERB_P[:, :2], B_NOUN_P)], [1, 1], "probs", "member 1 has verb/noun shapes"),
    ([(A_VERB_P, A_NOUN_P), (np.vstack([B_VERB_P] * 2), np.vstack([B_NOUN_P] * 2))], [1, 1], "logits",
     "same segments"),
    ([(A_VERB_P, A_NOUN_P)], [1, 2], "probs", "weights must be 1 finite non-negative numbers"),
    ([(A_VERB_P, A_NOUN_P), (B_VERB_P, B_NOUN_P)], [1, -1], "probs", "non-negative"),
    ([(A_VERB_P, A_NOUN_P), (B_VERB_P, B_NOUN_P)], [0, 0], "probs", "positive sum"),
    ([(A_VERB_P, A_NOUN_P)], None, "mean", "mode must be 'probs' or 'logits'"),
    ([], None, "probs", "at least one"),
    ([(A_VERB_P * np.nan, A_NOUN_P)], None, "probs", "NaN or infinite"),
])
def test_ensemble_refusals(members, weights, mode, message):
    with pytest.raises(EnsembleError, match=message) as error:
        ensemble(members, weights, mode=mode)
    assert isinstance(error.value, EpicfeatError)


# ------------------------------------------------------------------------- what the official C1 code reads
def _official_c1_metrics(verb_scores, noun_scores, verb_labels, noun_labels, top_n=100):
    """The official C1 scoring as published (utils/scoring.py + evaluate.py), written out step by step.

    Top-100 verb and noun scores per segment (ascending argsort reversed), scipy's ``softmax`` called WITHOUT an
    axis (one normalisation over the whole (N, 100) batch), the outer product, the 100 best pairs by the same
    reversed argsort, action id = verb * 1000 + noun; top-k = the label among the first k. Percent.
    """
    try:
        from scipy.special import softmax  # what the official code imports (a dev dependency)
    except ImportError:  # the same function: one normalisation over every element when no axis is given
        def softmax(x):
            shifted = np.exp(x - x.max())
            return shifted / shifted.sum()

    verb_scores, noun_scores = np.asarray(verb_scores), np.asarray(noun_scores)
    rows = np.arange(len(verb_scores))[:, None]  # (N, 1)
    top_verbs = np.argsort(verb_scores)[:, ::-1][:, :top_n]  # (N, 100)
    top_nouns = np.argsort(noun_scores)[:, ::-1][:, :top_n]
    verb_probs = softmax(verb_scores[rows, top_verbs])  # no axis: the whole batch
    noun_probs = softmax(noun_scores[rows, top_nouns])
    matrix = verb_probs[:, :, None] * noun_probs[:, None, :]  # (N, 100, 100)
    ranks = matrix.reshape(len(matrix), -1).argsort(axis=-1)[:, ::-1][:, :top_n]  # (N, 100)
    verb_rank, noun_rank = np.unravel_index(ranks, matrix.shape[1:])
    actions = top_verbs[rows, verb_rank] * 1000 + top_nouns[rows, noun_rank]  # (N, 100) ranked action ids
    action_labels = np.asarray(verb_labels) * 1000 + np.asarray(noun_labels)

    def topk(ranked, labels, k):
        return float((ranked[:, :k] == labels[:, None]).any(axis=1).mean() * 100)

    metrics = {}
    for k in (1, 5):
        metrics[f"all_verb_accuracy_at_{k}"] = topk(np.argsort(verb_scores)[:, ::-1], np.asarray(verb_labels), k)
        metrics[f"all_noun_accuracy_at_{k}"] = topk(np.argsort(noun_scores)[:, ::-1], np.asarray(noun_labels), k)
        metrics[f"all_action_accuracy_at_{k}"] = topk(actions, action_labels, k)
    return metrics


def _offset_logits(seed=0, n=400, n_verbs=97, n_nouns=300):
    """A model with some skill whose logits carry large per-segment offsets (spread 30), as real logits can."""
    rng = np.random.default_rng(seed)
    verb_labels, noun_labels = rng.integers(0, n_verbs, n), rng.integers(0, n_nouns, n)
    verbs = rng.normal(0, 1.5, (n, n_verbs))
    nouns = rng.normal(0, 1.5, (n, n_nouns))
    verbs[np.arange(n), verb_labels] += 4.0
    nouns[np.arange(n), noun_labels] += 4.0
    verbs += rng.normal(0, 30, (n, 1))  # per-segment offsets: they change no segment's own ranking
    nouns += rng.normal(0, 30, (n, 1))
    return verbs.astype(np.float32), nouns.astype(np.float32), verb_labels, noun_labels


def test_the_official_whole_batch_softmax_reads_our_pickle_and_json_as_our_metrics(tmp_path):
    from epicfeat.metrics import epic_metrics

    verbs, nouns, verb_labels, noun_labels = _offset_logits()
    ours = {k: v for k, v in epic_metrics(verbs, nouns, verb_labels, noun_labels).items()}
    assert ours["all_action_accuracy_at_1"] > 20  # a model with skill, by our (per-segment) reading
    # Raw logits: the whole-batch softmax underflows the segments far below the batch maximum (the finding).
    raw = _official_c1_metrics(verbs, nouns, verb_labels, noun_labels)
    assert raw["all_action_accuracy_at_1"] < ours["all_action_accuracy_at_1"] / 4

    ids = [f"P01_101_{i}" for i in range(len(verbs))]
    with open(write_results_pickle(tmp_path / "results.pkl", verbs, nouns, ids), "rb") as f:
        results = pickle.load(f)
    assert _official_c1_metrics(results["verb_output"], results["noun_output"], verb_labels, noun_labels) == ours
    # The stored scores are per-row log-probabilities: exp sums to 1 in every row.
    np.testing.assert_allclose(np.exp(results["verb_output"].astype(np.float64)).sum(axis=1), 1.0, rtol=1e-5)

    submission = json.loads(json.dumps(build_submission(verbs, nouns, ids, expected_ids=ids, n_verbs=97,
                                                        n_nouns=300, sls=SLS)))
    rows = [submission["results"][i] for i in ids]
    json_verbs = np.array([[row["verb"][str(c)] for c in range(97)] for row in rows], dtype=np.float32)
    json_nouns = np.array([[row["noun"][str(c)] for c in range(300)] for row in rows], dtype=np.float32)
    np.testing.assert_array_equal(json_verbs, results["verb_output"])  # test.json and the pickle agree exactly
    np.testing.assert_array_equal(json_nouns, results["noun_output"])
    assert _official_c1_metrics(json_verbs, json_nouns, verb_labels, noun_labels) == ours


def test_the_results_pickle_loads_without_numpy_2_internals(tmp_path):
    """numpy 1.x has no ``numpy._core``; the pickle may name nothing but ``numpy.ndarray(shape, dtype, buffer)``."""
    import subprocess
    import sys

    path = write_results_pickle(tmp_path / "results.pkl", VERBS, NOUNS, IDS)
    # A Python whose `numpy` is a stand-in with only `ndarray`, and whose numpy._core / numpy.core cannot import.
    loader = (
        "import pickle, sys, types\n"
        "fake = types.ModuleType('numpy')\n"
        "fake.ndarray = lambda shape, dtype, buffer: ('ndarray', list(shape), dtype, bytes(buffer).hex())\n"
        "sys.modules['numpy'] = fake\n"
        "for name in ('numpy._core', 'numpy._core.multiarray', 'numpy.core', 'numpy.core.multiarray'):\n"
        "    sys.modules[name] = None\n"
        "results = pickle.load(open(sys.argv[1], 'rb'))\n"
        "print(repr(results))\n"
    )
    done = subprocess.run([sys.executable, "-c", loader, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = eval(done.stdout)  # noqa: S307 - our own subprocess's repr of plain tuples, lists and strings
    arrays = {key: np.frombuffer(bytes.fromhex(hexed), dtype=dtype).reshape(shape)
              for key, (kind, shape, dtype, hexed) in loaded.items()}
    assert {kind for kind, *_ in loaded.values()} == {"ndarray"}
    assert arrays["narration_id"].tolist() == IDS
    with open(path, "rb") as f:
        results = pickle.load(f)  # the real numpy reads the same arrays, writable
    for key in ("verb_output", "noun_output", "narration_id"):
        np.testing.assert_array_equal(arrays[key], results[key])
        assert results[key].flags.writeable
