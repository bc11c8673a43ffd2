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
    write_results_pickle,
    write_submission_zip,
)

IDS = ["P01_101_0", "P01_101_1"]
VERBS = np.array([[0.5, -1.25, 3.1], [2.0, 0.0, -7.5]], dtype=np.float32)  # (2 segments, 3 verbs)
NOUNS = np.array([[2.0, -0.1], [0.25, 1e-3]], dtype=np.float32)            # (2 segments, 2 nouns)
SLS = {"sls_pt": 1, "sls_tl": 3, "sls_td": 3}


def _build(verbs=VERBS, nouns=NOUNS, ids=IDS, expected=IDS, n_verbs=3, n_nouns=2, **sls):
    return build_submission(verbs, nouns, ids, expected_ids=expected, n_verbs=n_verbs, n_nouns=n_nouns,
                            **{**SLS, **sls})


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
    np.testing.assert_array_equal(results["verb_output"], VERBS)
    np.testing.assert_array_equal(results["noun_output"], NOUNS)
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
    assert json.loads(text) == {
        "version": "0.2", "challenge": "action_recognition", "sls_pt": 1, "sls_tl": 3, "sls_td": 3,
        "results": {
            "P01_101_0": {"verb": {"0": 0.5, "1": -1.25, "2": 3.1}, "noun": {"0": 2.0, "1": -0.1}},
            "P01_101_1": {"verb": {"0": 2.0, "1": 0.0, "2": -7.5}, "noun": {"0": 0.25, "1": 0.001}},
        },
    }
    assert list(json.loads(text)["results"]) == IDS
    # float32 scores are written as their shortest exact decimals ("3.1", not 3.0999999046325684).
    assert '"2":3.1}' in text and '"1":0.001}' in text
    assert [p.name for p in tmp_path.iterdir()] == ["submission.zip"]


def test_submission_scores_read_back_as_the_same_float32_values():
    # Neighbouring float32 values that 6 significant digits would merge into one (a new tie) stay distinct.
    close = np.array([[1.0, np.nextafter(np.float32(1), np.float32(2)), 0.123456789, -3.3e-9]], dtype=np.float32)
    submission = _build(verbs=close[:, :3], nouns=close[:, 2:], ids=IDS[:1], expected=IDS[:1])
    results = json.loads(json.dumps(submission))["results"]["P01_101_0"]
    verbs = np.array([results["verb"][str(c)] for c in range(3)], dtype=np.float32)
    nouns = np.array([results["noun"][str(c)] for c in range(2)], dtype=np.float32)
    np.testing.assert_array_equal(verbs, close[0, :3])
    np.testing.assert_array_equal(nouns, close[0, 2:])
    assert verbs[0] != verbs[1]
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
