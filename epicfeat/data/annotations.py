"""EPIC-KITCHENS-100 annotation files: segments, class tables, video info, tail classes, unseen participants.

Every reader validates its file completely (vectorised) and raises ``AnnotationError`` naming the file, the first
bad row (1-based, header not counted, with its narration_id or video_id), how many others share the problem, the
column and what to do. Cells are read as strings, so a malformed one is reported, never silently coerced.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from epicfeat.errors import EpicfeatError

SPLIT_FILES = {
    "train": "EPIC_100_train.csv",
    "validation": "EPIC_100_validation.csv",
    "test": "EPIC_100_test_timestamps.csv",
}
VERB_CLASSES_FILE = "EPIC_100_verb_classes.csv"
NOUN_CLASSES_FILE = "EPIC_100_noun_classes.csv"
VIDEO_INFO_FILE = "EPIC_100_video_info.csv"
TAIL_FILES = {"verb": "EPIC_100_tail_verbs.csv", "noun": "EPIC_100_tail_nouns.csv"}
UNSEEN_FILES = {
    "validation": "EPIC_100_unseen_participant_ids_validation.csv",
    "test": "EPIC_100_unseen_participant_ids_test.csv",
}
ANNOTATIONS_REPO = "https://github.com/epic-kitchens/epic-kitchens-100-annotations"

# Columns every segment file has (train, validation and the unlabelled test file), then the labelled extras.
SEGMENT_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
                   "start_frame", "stop_frame")
LABEL_COLUMNS = ("verb_class", "noun_class")
# Text columns kept unvalidated (as strings) when the file has them.
OPTIONAL_TEXT_COLUMNS = ("narration_timestamp", "narration", "verb", "noun", "all_nouns", "all_noun_classes")

# HH:MM:SS.ff or HH:MM:SS.fff. Minutes and seconds must be below 60; nothing else is a timestamp.
_TIMESTAMP = r"(\d{2}):([0-5]\d):([0-5]\d)\.(\d{2,3})"
_NON_NEGATIVE_INT = r"\+?\d{1,18}"  # 18 digits always fit int64
_TIMESTAMP_ADVICE = "Timestamps must look like HH:MM:SS.ff or HH:MM:SS.fff (e.g. 00:01:02.35)."


class AnnotationError(EpicfeatError):
    """A missing, unreadable or malformed EPIC-100 annotation file; the message says where and what to do."""


@dataclass(frozen=True)
class ClassTable:
    """A verb or noun class table: ``keys[i]`` is the name of class id ``i`` (ids are 0..n-1)."""

    keys: tuple[str, ...]
    name: str  # "verb" or "noun"

    def __len__(self) -> int:
        return len(self.keys)


# -------------------------------------------------------------------------------------- reading and reporting helpers
def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV with every cell as a string ('' for empty), or raise an AnnotationError saying why it can't."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found. Check the annotations folder "
                              f"(the EPIC-100 CSVs come from {ANNOTATIONS_REPO}).") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: is a directory, not a CSV file. Point to the CSV file itself.") from None
    except OSError as error:
        raise AnnotationError(f"{path}: cannot be read ({error.strerror or error}). "
                              f"Check the file's permissions.") from None
    if not data.strip():
        raise AnnotationError(f"{path}: file is empty. Download it again from {ANNOTATIONS_REPO}.")
    if b"\x00" in data[:65536]:
        raise AnnotationError(f"{path}: is a binary file, not a CSV (it contains NUL bytes). "
                              f"Replace it with the CSV from {ANNOTATIONS_REPO}.")
    try:
        text = data.decode("utf-8-sig")  # -sig: a CSV re-saved by a spreadsheet may start with a BOM
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise AnnotationError(f"{path}: not UTF-8 text (invalid byte at offset {error.start}, line {line}). "
                              f"Save the file as UTF-8 CSV or download it again from {ANNOTATIONS_REPO}.") from None
    advice = f"Check it is the comma-separated file from {ANNOTATIONS_REPO}."
    try:
        with warnings.catch_warnings():
            # Without index_col=False, pandas silently turns the first columns into an index when the first row
            # has more fields than the header; with it, pandas only warns (and drops data): make that an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # dtype=str and no NA parsing: every cell stays the exact text of the file.
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                                index_col=False)
    except pd.errors.ParserWarning:
        raise AnnotationError(f"{path}: not a valid CSV file (a row has more fields than the header). "
                              f"{advice}") from None
    except (pd.errors.ParserError, ValueError) as error:
        raise AnnotationError(f"{path}: not a valid CSV file ({str(error).strip()}). {advice}") from None
    # Short rows are padded with NaN even with na_filter=False; treat them as empty cells.
    return frame.fillna("")


def _require_columns(path: Path, frame: pd.DataFrame, columns, advice: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        names = ", ".join(repr(column) for column in missing)
        found = ", ".join(repr(str(column)) for column in frame.columns[:20])
        raise AnnotationError(f"{path}: missing column(s) {names} (the header has: {found}). {advice}")


def _fail_rows(path: Path, frame: pd.DataFrame, bad, column: str, describe, advice: str,
               id_column: str | None) -> None:
    """Raise for the first row where ``bad`` is True, if any; ``describe(row)`` says what is wrong with that row."""
    rows = np.flatnonzero(np.asarray(bad, dtype=bool))
    if len(rows) == 0:
        return
    first = int(rows[0])
    where = f"row {first + 1}"  # 1-based data row, header not counted
    if id_column is not None:
        where += f" ({id_column} {frame[id_column].iloc[first]!r})"
    others = f" (and {len(rows) - 1} other row{'s' if len(rows) > 2 else ''})" if len(rows) > 1 else ""
    raise AnnotationError(f"{path}: {where}, column '{column}': {describe(first)}{others}. {advice}")


def _cell(frame: pd.DataFrame, column: str):
    """``describe`` helper: a function of a row giving that row's cell in ``column``, quoted."""
    return lambda row: repr(frame[column].iloc[row])


def _check_not_empty(path, frame, columns, id_column) -> None:
    for column in columns:
        _fail_rows(path, frame, frame[column].str.strip() == "", column, lambda row: "value is empty",
                   "Every row needs a value here.", id_column)


def _parse_non_negative_ints(path, frame, column, id_column, what: str = "a non-negative integer") -> pd.Series:
    """Validate a string column as non-negative integers and return it as int64."""
    text = frame[column].str.strip()
    cell = _cell(frame, column)
    _fail_rows(path, frame, ~text.str.fullmatch(_NON_NEGATIVE_INT), column, lambda row: f"{cell(row)} is not {what}",
               "Fix the value or re-download the file.", id_column)
    return text.astype("int64")


def _parse_timestamps(path, frame, column, id_column) -> pd.Series:
    """A column of 'HH:MM:SS.ff' / 'HH:MM:SS.fff' timestamps as float64 seconds, exact: integer milliseconds,
    then one correctly rounded division ('00:07:32.09' is float('452.09'), not 7 * 60 + 32.09)."""
    parts = frame[column].str.strip().str.extract(f"^{_TIMESTAMP}$")  # (rows, 4): hh, mm, ss, fraction
    cell = _cell(frame, column)
    _fail_rows(path, frame, parts[0].isna(), column, lambda row: f"invalid timestamp {cell(row)}",
               _TIMESTAMP_ADVICE, id_column)
    millis = (parts[0].astype("int64") * 3_600_000 + parts[1].astype("int64") * 60_000
              + parts[2].astype("int64") * 1000 + parts[3].str.ljust(3, "0").astype("int64"))
    return (millis / 1000.0).astype("float64")


def _check_unique(path, frame, values: pd.Series, column, id_column) -> None:
    """No value of ``values`` (the parsed ``column``) may repeat; the error names the row that repeats one."""
    duplicated = values.duplicated(keep="first").to_numpy()
    cell = _cell(frame, column)

    def describe(row: int) -> str:
        first_seen = int(np.flatnonzero((values == values.iloc[row]).to_numpy())[0]) + 1
        return f"duplicate {column} {cell(row)} (first seen in row {first_seen})"

    _fail_rows(path, frame, duplicated, column, describe,
               f"Each {column} must appear once: remove or fix the repeated row.", id_column)


def _check_class_ids(path, frame, ids: pd.Series, column, table: ClassTable, id_column) -> None:
    _fail_rows(path, frame, ids.to_numpy() >= len(table), column,
               lambda row: f"{table.name} class {ids.iloc[row]} is outside the {table.name} class table "
                           f"(ids 0..{len(table) - 1})",
               f"Use the {table.name} class CSV that belongs to these annotations.", id_column)


def _check_stop_after_start(path, frame, start: pd.Series, stop: pd.Series, start_column, stop_column,
                            id_column) -> None:
    _fail_rows(path, frame, (stop < start).to_numpy(), stop_column,
               lambda row: f"stop {frame[stop_column].iloc[row]!r} is before {start_column} "
                           f"{frame[start_column].iloc[row]!r}",
               "A segment must stop at or after it starts: fix or remove the row.", id_column)


# ----------------------------------------------------------------------------------------------------- public readers
def read_class_table(path: str | Path, name: str) -> ClassTable:
    """Read ``EPIC_100_verb_classes.csv`` or ``EPIC_100_noun_classes.csv`` (columns id, key, ...).

    ``name`` is "verb" or "noun". The ids must be exactly 0..n-1 (any row order) and keys unique.
    """
    path = Path(path)
    frame = _read_csv(path)
    _require_columns(path, frame, ("id", "key"),
                     f"A {name} class CSV has the header id,key,instances,category (from {ANNOTATIONS_REPO}).")
    _check_not_empty(path, frame, ("key",), None)
    ids = _parse_non_negative_ints(path, frame, "id", None)
    _check_unique(path, frame, ids, "id", None)
    _fail_rows(path, frame, ids.to_numpy() >= len(frame), "id",
               lambda row: f"id {ids.iloc[row]} leaves a gap: {len(frame)} classes need ids 0..{len(frame) - 1}",
               "Class ids must be consecutive from 0.", None)
    _check_unique(path, frame, frame["key"].str.strip(), "key", None)
    keys = frame["key"].str.strip().to_numpy()[np.argsort(ids.to_numpy())]  # row i of the table = class id i
    return ClassTable(keys=tuple(str(key) for key in keys), name=name)


def read_segments(path: str | Path, *, labelled: bool, verbs: ClassTable | None = None,
                  nouns: ClassTable | None = None) -> pd.DataFrame:
    """Read and validate a train/validation (``labelled=True``) or test-timestamps (``labelled=False``) CSV.

    Returns one row per segment in file order with columns narration_id, participant_id, video_id (str);
    start_timestamp, stop_timestamp (the original strings); start_sec, stop_sec (float64); start_frame,
    stop_frame (int64); when labelled also verb_class, noun_class (int64); then whichever of narration_timestamp,
    narration, verb, noun, all_nouns, all_noun_classes the file has (unvalidated strings). Other columns are
    dropped. With ``verbs``/``nouns`` given, class ids must lie inside those tables.
    """
    path = Path(path)
    frame = _read_csv(path)
    required = SEGMENT_COLUMNS + (LABEL_COLUMNS if labelled else ())
    looks_like_test_file = set(SEGMENT_COLUMNS) <= set(frame.columns) and not set(LABEL_COLUMNS) & set(frame.columns)
    if labelled and looks_like_test_file:
        advice = "Is this an unlabelled test file? Those are read with labelled=False."
    else:
        advice = f"Use the EPIC-100 CSV from {ANNOTATIONS_REPO}, whose header names these columns."
    _require_columns(path, frame, required, advice)
    ident = "narration_id"

    _check_not_empty(path, frame, ("narration_id", "participant_id", "video_id"), ident)
    _check_unique(path, frame, frame["narration_id"].str.strip(), "narration_id", ident)
    start_sec = _parse_timestamps(path, frame, "start_timestamp", ident)
    stop_sec = _parse_timestamps(path, frame, "stop_timestamp", ident)
    start_frame = _parse_non_negative_ints(path, frame, "start_frame", ident)
    stop_frame = _parse_non_negative_ints(path, frame, "stop_frame", ident)
    _check_stop_after_start(path, frame, start_sec, stop_sec, "start_timestamp", "stop_timestamp", ident)
    _check_stop_after_start(path, frame, start_frame, stop_frame, "start_frame", "stop_frame", ident)

    segments = pd.DataFrame({
        "narration_id": frame["narration_id"].str.strip(),
        "participant_id": frame["participant_id"].str.strip(),
        "video_id": frame["video_id"].str.strip(),
        "start_timestamp": frame["start_timestamp"],
        "stop_timestamp": frame["stop_timestamp"],
        "start_sec": start_sec,
        "stop_sec": stop_sec,
        "start_frame": start_frame,
        "stop_frame": stop_frame,
    })
    if labelled:
        for column, table in (("verb_class", verbs), ("noun_class", nouns)):
            ids = _parse_non_negative_ints(path, frame, column, ident, what="a class id (non-negative integer)")
            if table is not None:
                _check_class_ids(path, frame, ids, column, table, ident)
            segments[column] = ids
    for column in OPTIONAL_TEXT_COLUMNS:
        if column in frame.columns:
            segments[column] = frame[column]
    return segments.reset_index(drop=True)


def read_video_info(path: str | Path) -> pd.DataFrame:
    """Read ``EPIC_100_video_info.csv``: index video_id; columns duration (s), fps (float64), width, height (int64)."""
    path = Path(path)
    frame = _read_csv(path)
    _require_columns(path, frame, ("video_id", "duration", "fps", "resolution"),
                     f"The video info CSV has the header video_id,duration,fps,resolution (from {ANNOTATIONS_REPO}).")
    ident = "video_id"
    _check_not_empty(path, frame, ("video_id",), ident)
    _check_unique(path, frame, frame["video_id"].str.strip(), "video_id", ident)
    numbers = {}
    for column in ("duration", "fps"):
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce").astype("float64")  # '' / 'abc' -> NaN
        cell = _cell(frame, column)
        positive = np.isfinite(values.to_numpy()) & (values.to_numpy() > 0)
        _fail_rows(path, frame, ~positive, column, lambda row: f"{cell(row)} is not a positive number",
                   "Fix the value or re-download the file.", ident)
        numbers[column] = values
    size = frame["resolution"].str.strip().str.extract(r"^(\d{1,6})x(\d{1,6})$")  # (rows, 2) width, height
    cell = _cell(frame, "resolution")
    _fail_rows(path, frame, size[0].isna(), "resolution", lambda row: f"{cell(row)} is not WIDTHxHEIGHT",
               "Write it like 1920x1080.", ident)
    return pd.DataFrame({
        "duration": numbers["duration"].to_numpy(),
        "fps": numbers["fps"].to_numpy(),
        "width": size[0].astype("int64").to_numpy(),
        "height": size[1].astype("int64").to_numpy(),
    }, index=pd.Index(frame["video_id"].str.strip(), name="video_id"))


def read_id_list(path: str | Path, column: str, *, table: ClassTable | None = None) -> pd.Series:
    """Read a one-column CSV (tail classes: ``verb``/``noun`` ids; unseen participants: ``participant_id``).

    With ``table`` the values are class ids (int64) checked against it; otherwise non-empty strings.
    """
    path = Path(path)
    frame = _read_csv(path)
    _require_columns(path, frame, (column,), f"This CSV has a single column '{column}' (from {ANNOTATIONS_REPO}).")
    if table is None:
        _check_not_empty(path, frame, (column,), None)
        return frame[column].str.strip()
    ids = _parse_non_negative_ints(path, frame, column, None, what="a class id (non-negative integer)")
    _check_class_ids(path, frame, ids, column, table, None)
    return ids


# ---------------------------------------------------------------------------------------------- the annotation folder
class EpicAnnotations:
    """One EPIC-100 annotation folder (the ``EPIC_100_*.csv`` files), read lazily and cached. ``train_file``
    replaces the train CSV, e.g. ``"EPIC_100_uda_source_train.csv"`` (a real subset with the same schema)."""

    def __init__(self, root: str | Path, *, train_file: str = SPLIT_FILES["train"]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AnnotationError(f"{self.root}: annotations folder not found. Pass the folder holding the "
                                  f"EPIC_100_*.csv files (clone {ANNOTATIONS_REPO}).")
        self.split_files = {**SPLIT_FILES, "train": train_file}
        self._segments: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"EpicAnnotations({str(self.root)!r})"

    @cached_property
    def verbs(self) -> ClassTable:
        """The verb class table (97 classes in EPIC-100)."""
        return read_class_table(self.root / VERB_CLASSES_FILE, "verb")

    @cached_property
    def nouns(self) -> ClassTable:
        """The noun class table (300 classes in EPIC-100)."""
        return read_class_table(self.root / NOUN_CLASSES_FILE, "noun")

    @cached_property
    def video_info(self) -> pd.DataFrame:
        """Index video_id; columns duration (s), fps, width, height."""
        return read_video_info(self.root / VIDEO_INFO_FILE)

    @cached_property
    def tail_verbs(self) -> frozenset[int] | None:
        """Verb classes of the official tail metrics, or None when the CSV is absent."""
        return self._tail("verb", self.verbs)

    @cached_property
    def tail_nouns(self) -> frozenset[int] | None:
        """Noun classes of the official tail metrics, or None when the CSV is absent."""
        return self._tail("noun", self.nouns)

    def _tail(self, name: str, table: ClassTable) -> frozenset[int] | None:
        path = self.root / TAIL_FILES[name]
        if not path.exists():
            return None
        return frozenset(int(i) for i in read_id_list(path, name, table=table))

    def unseen_participants(self, split: str) -> frozenset[str] | None:
        """Participants of ``split`` ("validation" or "test") absent from training; None when the CSV is absent."""
        if split not in UNSEEN_FILES:
            raise AnnotationError(f"unseen participants exist only for the splits {sorted(UNSEEN_FILES)}, "
                                  f"not {split!r}.")
        path = self.root / UNSEEN_FILES[split]
        if not path.exists():
            return None
        return frozenset(read_id_list(path, "participant_id"))

    def segments(self, split: str) -> pd.DataFrame:
        """A fresh copy of the validated segments of "train", "validation", "test" or "train+validation"."""
        if split == "train+validation":
            return pd.concat([self.segments("train"), self.segments("validation")], ignore_index=True)
        if split not in self.split_files:
            raise AnnotationError(f"unknown split {split!r}: choose one of "
                                  f"{', '.join(list(SPLIT_FILES) + ['train+validation'])}.")
        if split not in self._segments:
            path = self.root / self.split_files[split]
            if split == "train" and not path.exists():
                raise AnnotationError(
                    f"{path}: train annotations file is missing. The full {SPLIT_FILES['train']} (67,217 segments) "
                    f"comes from the epic-kitchens-100-annotations repository ({ANNOTATIONS_REPO}): copy it into "
                    f"{self.root}, or use another train CSV with the same schema via "
                    f"EpicAnnotations(root, train_file=...), e.g. EPIC_100_uda_source_train.csv.")
            self._segments[split] = read_segments(path, labelled=split != "test", verbs=self.verbs,
                                                  nouns=self.nouns)
        return self._segments[split].copy()

    def video_ids(self, split: str) -> list[str]:
        """Sorted unique video ids of a split; "all" is the union of train, validation and test."""
        splits = ("train", "validation", "test") if split == "all" else (split,)
        ids: set[str] = set()
        for name in splits:
            ids.update(self.segments(name)["video_id"])
        return sorted(ids)
