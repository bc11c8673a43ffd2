"""Files the EPIC-KITCHENS-100 tools read: the results pickle, the leaderboard zip; and score ensembles.

Formats follow github.com/epic-kitchens/C1-Action-Recognition:

* Results pickle: ``{'verb_output': float32 (N, C_v), 'noun_output': float32 (N, C_n), 'narration_id': ndarray
  of str (N,)}``, rows aligned with ``narration_id``, readable by numpy 1.x and 2 (``_PortableArray``).
* Submission: a zip holding ``test.json`` = ``{"version": "0.2", "challenge": "action_recognition",
  "sls_pt": int, "sls_tl": int, "sls_td": int, "results": {narration_id: {"verb": {"0": score, ...},
  "noun": {"0": score, ...}}}}`` with every class index as a string key.

Scores are per-row log-probabilities (``log_softmax_rows``) in both files: the official action scoring softmaxes
over the whole batch, not per segment, and only rows of log-probabilities keep its ranking equal to ours.
Every writer is atomic: a crash or a refusal leaves no file.
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from epicfeat.errors import EpicfeatError, listed
from epicfeat.files import atomic_write

SUBMISSION_VERSION = "0.2"
CHALLENGE = "action_recognition"
SUBMISSION_MEMBER = "test.json"  # the one file inside the zip
SLS_KEYS = ("sls_pt", "sls_tl", "sls_td")  # supervision levels: pretraining, training labels, training data
PICKLE_PROTOCOL = 4  # readable by every Python the official scripts run on (protocol 5 needs 3.8+)
_POWERS_OF_TEN = np.array([float(10**k) for k in range(23)])  # exact doubles 1e0..1e22


class SubmissionError(EpicfeatError):
    """Scores that must not become a results file or a leaderboard submission; nothing was written."""


class EnsembleError(EpicfeatError):
    """Score sets that cannot be combined (different shapes, bad weights)."""


# ----------------------------------------------------------------------------------------------- helpers
def _repeated(ids: Iterable[str]) -> list[str]:
    return [i for i, count in Counter(ids).items() if count > 1]


def _nonfinite_rows(scores: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(scores).all(axis=1))


def _score_matrix(scores, name: str) -> np.ndarray:
    array = np.asarray(scores)
    if array.ndim != 2:
        raise SubmissionError(f"{name}: expected a 2-D array (segments, classes), got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise SubmissionError(f"{name}: expected numbers, got dtype {array.dtype}.")
    return array


def log_softmax_rows(scores) -> np.ndarray:
    """Per-row log-probabilities of logits (N, C) as float32: what the results pickle and test.json hold.

    Computed in float64 and rounded once, so the same scores always give bit-identical files.
    """
    return _log_softmax(np.asarray(scores, dtype=np.float64)).astype(np.float32)  # (N, C)


class _PortableArray:
    """Pickles an array as ``numpy.ndarray(shape, dtype_string, bytearray)``: numpy 2's own pickles name
    ``numpy._core.multiarray``, which numpy 1.x lacks. A bytearray buffer makes the loaded array writable."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        return np.ndarray, (tuple(int(n) for n in self.array.shape), self.array.dtype.str,
                            bytearray(self.array.tobytes()))


def _shortest_float32(values: np.ndarray) -> np.ndarray:
    """float64 values whose shortest decimal (what ``json`` writes) reads back as exactly ``values`` in float32.

    A fixed 6 digits would make distinct scores equal and change the ranking of close classes. Each value tries
    6, 7, 8 then 9 significant digits (9 always round-trips), rounded with exact powers of ten (up to 1e22);
    values beyond them (|x| below ~1e-14 or above ~1e27) fall back to numpy's own shortest repr.
    """
    values = np.asarray(values, dtype=np.float32)
    wide = values.astype(np.float64)
    result = np.zeros_like(wide)
    done = wide == 0  # zeros (either sign) are exact as they are
    result[done] = wide[done]
    magnitude = np.floor(np.log10(np.abs(np.where(done, 1.0, wide))))  # decimal exponent of each value
    for digits in (6, 7, 8, 9):
        exponent = digits - 1 - magnitude  # round x to a multiple of 10 ** -exponent
        exact = ~done & (np.abs(exponent) <= 22)  # powers of ten up to 1e22 are exact doubles
        up = np.where(exact, _POWERS_OF_TEN[np.clip(exponent, 0, 22).astype(np.int64)], 1.0)
        down = np.where(exact, _POWERS_OF_TEN[np.clip(-exponent, 0, 22).astype(np.int64)], 1.0)
        rounded = np.round(wide * up / down) / up * down  # one of up/down is 1
        fits = exact & (rounded.astype(np.float32) == values)
        result[fits] = rounded[fits]
        done |= fits
    for index in zip(*np.nonzero(~done)):
        result[index] = float(str(values[index]))  # numpy prints the shortest round-tripping float32 decimal
    return result


# ----------------------------------------------------------------------------------------------- results pickle
def write_results_pickle(path: str | Path, verb_logits, noun_logits, narration_ids: Sequence[str]) -> Path:
    """Write the results file the official EPIC-100 ``evaluate.py`` reads (module docstring), atomically.

    Takes logits (or ensemble log-probabilities), one row per narration_id; refuses (SubmissionError, nothing
    written) mismatched lengths, repeated narration_ids and NaN/inf scores.
    """
    verbs = _score_matrix(verb_logits, "verb_logits").astype(np.float32)  # (N, C_v)
    nouns = _score_matrix(noun_logits, "noun_logits").astype(np.float32)  # (N, C_n)
    ids = np.array([str(i) for i in narration_ids], dtype=str)  # (N,) '<U..'
    if not (len(verbs) == len(nouns) == len(ids)):
        raise SubmissionError(f"{path}: {len(verbs)} verb rows, {len(nouns)} noun rows and {len(ids)} "
                              f"narration_ids; they must be one row per narration_id.")
    repeated = _repeated(ids.tolist())
    if repeated:
        raise SubmissionError(f"{path}: narration_id(s) repeated: {listed(repeated)}. Score each segment once.")
    bad = sorted(set(_nonfinite_rows(verbs)) | set(_nonfinite_rows(nouns)))
    if bad:
        raise SubmissionError(f"{path}: NaN or infinite scores (after float32 conversion) for "
                              f"{listed(ids[bad].tolist())}. Check the checkpoint; nothing was written.")
    results = {"verb_output": _PortableArray(log_softmax_rows(verbs)),
               "noun_output": _PortableArray(log_softmax_rows(nouns)), "narration_id": _PortableArray(ids)}
    return atomic_write(path, lambda f: pickle.dump(results, f, protocol=PICKLE_PROTOCOL))


# ----------------------------------------------------------------------------------------------- submission
def _check_sls(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 5:
        raise SubmissionError(f"{name} must be an integer supervision level from 0 to 5, got {value!r} "
                              f"(see https://github.com/epic-kitchens/SLS).")
    return int(value)


def build_submission(verb_scores, noun_scores, narration_ids: Sequence[str], *, expected_ids: Iterable[str],
                     n_verbs: int, n_nouns: int, sls: Mapping[str, int]) -> dict:
    """The leaderboard's ``test.json`` content, after checking every row is present exactly once and finite.

    verb_scores (N, n_verbs) and noun_scores (N, n_nouns) are logits or log-probabilities, rows aligned with
    narration_ids, written as ``write_results_pickle`` stores them; results follow the order of ``expected_ids``
    (the split's narration_ids). ``sls`` holds the three supervision levels (``SLS_KEYS``). Refuses with one
    SubmissionError listing every problem.
    """
    sls = {name: _check_sls(name, sls.get(name)) for name in SLS_KEYS}
    verbs = _score_matrix(verb_scores, "verb_scores")
    nouns = _score_matrix(noun_scores, "noun_scores")
    ids = [str(i) for i in narration_ids]
    expected = [str(i) for i in expected_ids]

    problems = []
    if verbs.shape[1] != n_verbs:
        problems.append(f"verb scores have {verbs.shape[1]} classes but the verb class table has {n_verbs}")
    if nouns.shape[1] != n_nouns:
        problems.append(f"noun scores have {nouns.shape[1]} classes but the noun class table has {n_nouns}")
    if not (len(verbs) == len(nouns) == len(ids)):
        problems.append(f"{len(verbs)} verb rows, {len(nouns)} noun rows and {len(ids)} narration_ids "
                        f"(must be one row per narration_id)")
    repeated_expected = _repeated(expected)
    if repeated_expected:
        problems.append(f"the expected split lists narration_id(s) more than once: {listed(repeated_expected)}")
    repeated = _repeated(ids)
    if repeated:
        problems.append(f"narration_id(s) scored more than once: {listed(repeated)}")
    expected_set, id_set = set(expected), set(ids)
    unknown = [i for i in dict.fromkeys(ids) if i not in expected_set]
    if unknown:
        problems.append(f"narration_id(s) not in the split: {listed(unknown)}")
    missing = [i for i in expected if i not in id_set]
    if missing:
        problems.append(f"{len(missing)} narration_id(s) of the split have no scores: {listed(missing)}")
    if len(verbs) == len(nouns) == len(ids):
        bad = sorted(set(_nonfinite_rows(verbs)) | set(_nonfinite_rows(nouns)))
        if bad:
            problems.append(f"NaN or infinite scores for {listed([ids[row] for row in bad])}")
    if problems:
        raise SubmissionError("cannot build the submission: " + "; ".join(problems) +
                              ". Score exactly the split's segments with a finite model and the class tables it "
                              "was trained with; nothing was written.")

    verb_values = _shortest_float32(log_softmax_rows(verbs.astype(np.float32))).tolist()  # (N, C_v) Python floats
    noun_values = _shortest_float32(log_softmax_rows(nouns.astype(np.float32))).tolist()  # (N, C_n)
    verb_keys = [str(c) for c in range(n_verbs)]
    noun_keys = [str(c) for c in range(n_nouns)]
    row_of = {narration_id: row for row, narration_id in enumerate(ids)}
    results = {}
    for narration_id in expected:  # the split's order
        row = row_of[narration_id]
        results[narration_id] = {"verb": dict(zip(verb_keys, verb_values[row])),
                                 "noun": dict(zip(noun_keys, noun_values[row]))}
    return {"version": SUBMISSION_VERSION, "challenge": CHALLENGE, **sls, "results": results}


def _check_submission_structure(submission: dict) -> None:
    """Cheap structural checks so a hand-edited dict cannot become a broken upload."""
    if not isinstance(submission, dict):
        raise SubmissionError(f"submission must be a dict, got {type(submission).__name__}.")
    if submission.get("version") != SUBMISSION_VERSION or submission.get("challenge") != CHALLENGE:
        raise SubmissionError(f"submission must have version {SUBMISSION_VERSION!r} and challenge {CHALLENGE!r}, "
                              f"got {submission.get('version')!r} and {submission.get('challenge')!r}.")
    for name in SLS_KEYS:
        _check_sls(name, submission.get(name))
    results = submission.get("results")
    if not isinstance(results, dict) or not results:
        raise SubmissionError("submission['results'] must be a non-empty dict keyed by narration_id.")
    bad = [narration_id for narration_id, entry in results.items()
           if not isinstance(entry, dict) or set(entry) != {"verb", "noun"}
           or not all(isinstance(value, float) and math.isfinite(value)
                      for task in ("verb", "noun") for value in entry[task].values())]
    if bad:
        raise SubmissionError(f"submission results need finite float 'verb' and 'noun' scores; bad entries: "
                              f"{listed(bad)}. Build it with build_submission.")


def write_submission_zip(path: str | Path, submission: dict) -> Path:
    """Write ``submission`` (from ``build_submission``) as a zip holding ``test.json``, atomically."""
    _check_submission_structure(submission)
    text = json.dumps(submission, allow_nan=False, separators=(",", ":"))  # compact: the file is ~60 MB

    def write(f: IO[bytes]) -> None:
        # Deflate level 5, as the official tool.
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=5) as archive:
            archive.writestr(SUBMISSION_MEMBER, text)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------- ensembles
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def ensemble(logit_sets: Sequence[tuple[Any, Any]], weights: Sequence[float] | None = None, *,
             mode: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """Combine several models' (verb (N, C_v), noun (N, C_n)) logits into one (verb, noun) pair, float32.

    weights: one per set, >= 0, normalised (None = equal). mode "probs": the log of the weighted mean of softmax
    probabilities (scoring softmaxes what it is given, and the softmax of log p is p); "logits": the weighted
    mean of the logits.
    """
    if mode not in ("probs", "logits"):
        raise EnsembleError(f"ensemble mode must be 'probs' or 'logits', got {mode!r}.")
    if not logit_sets:
        raise EnsembleError("ensemble needs at least one (verb, noun) score set.")
    sets = [(np.asarray(verb, dtype=np.float64), np.asarray(noun, dtype=np.float64)) for verb, noun in logit_sets]
    weights = np.ones(len(sets)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(sets),) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise EnsembleError(f"ensemble weights must be {len(sets)} finite non-negative numbers with a positive sum, "
                            f"got {weights.tolist()}.")
    weights = weights / weights.sum()
    verb_shape, noun_shape = sets[0][0].shape, sets[0][1].shape
    for index, (verb, noun) in enumerate(sets):
        if verb.ndim != 2 or noun.ndim != 2 or verb.shape != verb_shape or noun.shape != noun_shape \
                or len(verb) != len(noun):
            raise EnsembleError(f"ensemble member {index} has verb/noun shapes {verb.shape}/{noun.shape}, member 0 "
                                f"has {verb_shape}/{noun_shape}: members must score the same segments with the "
                                f"same class tables.")
        if not (np.isfinite(verb).all() and np.isfinite(noun).all()):
            raise EnsembleError(f"ensemble member {index} has NaN or infinite scores.")

    members = [(weight, verb, noun) for weight, (verb, noun) in zip(weights, sets) if weight > 0]
    if mode == "logits":
        verb = sum(weight * verb for weight, verb, _ in members)  # (N, C_v)
        noun = sum(weight * noun for weight, _, noun in members)  # (N, C_n)
    else:
        # log(sum_i w_i * softmax_i) = logsumexp_i(log w_i + log_softmax_i), member axis first: (M, N, C)
        verb = np.logaddexp.reduce(np.stack([np.log(w) + _log_softmax(v) for w, v, _ in members]), axis=0)
        noun = np.logaddexp.reduce(np.stack([np.log(w) + _log_softmax(n) for w, _, n in members]), axis=0)
    return verb.astype(np.float32), noun.astype(np.float32)
