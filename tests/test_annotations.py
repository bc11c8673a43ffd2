"""EPIC-100 annotation layer: the real files (exact counts), timestamp parsing, and every malformed-input error."""
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from epicfeat.data.annotations import (
    AnnotationError,
    ClassTable,
    EpicAnnotations,
    read_class_table,
    read_segments,
    read_video_info,
)
from epicfeat.errors import EpicfeatError

UDA_TRAIN = "EPIC_100_uda_source_train.csv"


# ----------------------------------------------------------------------------------------------------------------
# The real EPIC-100 files


@pytest.fixture(scope="module")
def epic(shared_annotations) -> EpicAnnotations:
    return EpicAnnotations(shared_annotations, train_file=UDA_TRAIN)


def test_class_tables(epic):
    assert len(epic.verbs) == 97 and epic.verbs.name == "verb"
    assert len(epic.nouns) == 300 and epic.nouns.name == "noun"
    assert epic.verbs.keys[:3] == ("take", "put", "wash")
    assert epic.nouns.keys[:3] == ("tap", "spoon", "plate")
    assert len(set(epic.nouns.keys)) == 300


def test_validation_segments(epic):
    val = epic.segments("validation")
    assert len(val) == 9668
    assert val["narration_id"].is_unique
    assert val["video_id"].nunique() == 138
    assert list(val.columns[:11]) == ["narration_id", "participant_id", "video_id", "start_timestamp",
                                      "stop_timestamp", "start_sec", "stop_sec", "start_frame", "stop_frame",
                                      "verb_class", "noun_class"]
    assert {"narration", "verb", "noun"} <= set(val.columns)
    for column in ("start_sec", "stop_sec"):
        assert val[column].dtype == np.float64
    for column in ("start_frame", "stop_frame", "verb_class", "noun_class"):
        assert val[column].dtype == np.int64
    # First row of the file: P01_11_0,P01,P01_11,00:00:00.560,00:00:00.00,00:00:01.89,1,113,take plate,take,0,plate,2
    first = val.iloc[0]
    assert (first.narration_id, first.video_id, first.start_timestamp) == ("P01_11_0", "P01_11", "00:00:00.00")
    assert (first.start_sec, first.stop_sec, first.start_frame, first.stop_frame) == (0.0, 1.89, 1, 113)
    assert (first.verb_class, first.noun_class, first.narration) == (0, 2, "take plate")
    assert (val["stop_sec"] >= val["start_sec"]).all()
    assert val["verb_class"].max() < 97 and val["noun_class"].max() < 300


def test_timestamps_are_exact_decimal_seconds(epic):
    val = epic.segments("validation")
    expected = [float(int(t[:2]) * 3600 + int(t[3:5]) * 60 + Decimal(t[6:])) for t in val["stop_timestamp"]]
    assert val["stop_sec"].tolist() == expected  # bit-identical, not approximately


def test_test_segments_are_unlabelled(epic):
    test = epic.segments("test")
    assert len(test) == 13092
    assert "verb_class" not in test.columns and "noun_class" not in test.columns
    assert test["start_frame"].dtype == np.int64


def test_train_file_missing_and_override(shared_annotations, epic):
    with pytest.raises(AnnotationError) as info:
        EpicAnnotations(shared_annotations).segments("train")
    message = str(info.value)
    assert "EPIC_100_train.csv" in message and "missing" in message
    assert "epic-kitchens-100-annotations" in message

    assert len(epic.segments("train")) == 16115
    both = epic.segments("train+validation")
    assert len(both) == 16115 + 9668
    assert both["narration_id"].iloc[16115] == "P01_11_0"
    assert both.index.tolist() == list(range(len(both)))


def test_segments_returns_a_fresh_copy(epic):
    segments = epic.segments("validation")
    segments.loc[0, "verb_class"] = 99
    assert epic.segments("validation").loc[0, "verb_class"] == 0


def test_video_info(epic):
    info = epic.video_info
    assert len(info) == 700 and info.index.name == "video_id"
    assert list(info.columns) == ["duration", "fps", "width", "height"]
    assert info["fps"].dtype == np.float64 and info["width"].dtype == np.int64
    assert info.loc["P01_01", "duration"] == 1652.152817
    assert info.loc["P01_01", "fps"] == pytest.approx(59.94, abs=1e-3)
    assert (info["width"].astype(str) + "x" + info["height"].astype(str)).value_counts().to_dict() == {
        "1920x1080": 694, "1280x720": 4, "1920x1440": 2}
    assert info["fps"].round(2).value_counts().to_dict() == {59.94: 423, 50.0: 268, 29.97: 4, 47.95: 4, 90.0: 1}


def test_tail_classes_and_unseen_participants(epic):
    assert len(epic.tail_verbs) == 86 and len(epic.tail_nouns) == 228
    assert min(epic.tail_verbs) == 10 and min(epic.tail_nouns) == 56
    assert all(isinstance(i, int) for i in epic.tail_verbs)
    assert epic.unseen_participants("validation") == frozenset({"P18", "P32"})
    assert epic.unseen_participants("test") == frozenset({"P33", "P34", "P36"})
    with pytest.raises(AnnotationError, match="validation"):
        epic.unseen_participants("train")


def test_video_ids(epic):
    validation = epic.video_ids("validation")
    assert len(validation) == 138 and validation == sorted(validation)
    union = set(epic.video_ids("train")) | set(validation) | set(epic.video_ids("test"))
    assert epic.video_ids("all") == sorted(union)
    with pytest.raises(AnnotationError, match="unknown split 'val'"):
        epic.video_ids("val")


# ----------------------------------------------------------------------------------------------------------------
# Malformed files: each must raise AnnotationError naming the file, the row and the column

HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
          "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class")
ROWS = [
    ["P01_01_0", "P01", "P01_01", "00:00:01.089", "00:00:00.14", "00:00:03.37", "8", "202", "open door", "open",
     "1", "door", "0"],
    ["P01_01_1", "P01", "P01_01", "00:00:02.629", "00:00:04.37", "00:00:06.170", "262", "370", "take cup", "take",
     "0", "cup", "1"],
    ["P02_03_7", "P02", "P02_03", "00:01:00.000", "00:01:00.50", "00:01:02.00", "1525", "1600", "put cup", "put",
     "2", "cup", "1"],
]
VERBS = ClassTable(keys=("take", "open", "put"), name="verb")
NOUNS = ClassTable(keys=("door", "cup"), name="noun")
COLUMN = {name: i for i, name in enumerate(HEADER.split(","))}


def _write_segments(tmp_path: Path, rows=None, header=HEADER, name="EPIC_100_validation.csv") -> Path:
    path = tmp_path / name
    lines = [header] + [",".join(row) for row in (ROWS if rows is None else rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _with_cell(row: int, column: str, value: str) -> list[list[str]]:
    rows = [list(r) for r in ROWS]
    rows[row][COLUMN[column]] = value
    return rows


@pytest.mark.parametrize("text, seconds", [
    ("00:00:00.00", 0.0),
    ("00:00:01.10", 1.1),
    ("00:07:32.09", 452.09),  # 7*60 + float(32.09) would give 452.09000000000003
    ("01:02:03.456", 3723.456),
    ("00:59:59.999", 3599.999),
    (" 00:00:02.86 ", 2.86),  # surrounding whitespace tolerated
])
def test_timestamps_exact(tmp_path, text, seconds):
    rows = _with_cell(0, "start_timestamp", text)
    rows[0][COLUMN["stop_timestamp"]] = text
    segments = read_segments(_write_segments(tmp_path, rows), labelled=True)
    assert segments["start_sec"].iloc[0] == segments["stop_sec"].iloc[0] == seconds


@pytest.mark.parametrize("text", ["", "00:00:01", "0:00:01.00", "00:60:00.00", "00:00:60.00", "00:00:01.1234",
                                  "00:00:01,50", "aa:bb:cc.dd", "-00:00:01.00", "00:00:01.00x",
                                  "00:00:01.5"])  # one fraction digit
def test_timestamps_rejected(tmp_path, text):
    path = _write_segments(tmp_path, _with_cell(0, "start_timestamp", f'"{text}"'))
    with pytest.raises(AnnotationError, match="HH:MM:SS.ff"):
        read_segments(path, labelled=True)


def _error(path: Path, **kwargs) -> str:
    kwargs.setdefault("labelled", True)
    with pytest.raises(AnnotationError) as info:
        read_segments(path, verbs=VERBS, nouns=NOUNS, **kwargs)
    assert isinstance(info.value, EpicfeatError)
    message = str(info.value)
    assert path.name in message
    return message


def test_tiny_valid_file(tmp_path):
    segments = read_segments(_write_segments(tmp_path), labelled=True, verbs=VERBS, nouns=NOUNS)
    assert segments["narration_id"].tolist() == ["P01_01_0", "P01_01_1", "P02_03_7"]
    assert segments["start_sec"].tolist() == [0.14, 4.37, 60.5]
    assert segments["stop_sec"].tolist() == [3.37, 6.17, 62.0]
    assert segments["stop_timestamp"].tolist() == ["00:00:03.37", "00:00:06.170", "00:01:02.00"]
    assert segments["verb_class"].tolist() == [1, 0, 2] and segments["noun_class"].tolist() == [0, 1, 1]


@pytest.mark.parametrize("column, value, problem", [
    ("start_timestamp", "00:00:4.37", "invalid timestamp '00:00:4.37'"),
    ("stop_timestamp", "", "invalid timestamp ''"),
    ("stop_timestamp", "00:00:04.00", "stop '00:00:04.00' is before start_timestamp '00:00:04.37'"),
    ("stop_frame", "261", "stop '261' is before start_frame '262'"),
    ("start_frame", "262.5", "'262.5' is not a non-negative integer"),
    ("stop_frame", "-3", "'-3' is not a non-negative integer"),
    ("verb_class", "x", "'x' is not a class id"),
    ("verb_class", "3", "verb class 3 is outside the verb class table (ids 0..2)"),
    ("noun_class", "2", "noun class 2 is outside the noun class table (ids 0..1)"),
    ("video_id", " ", "value is empty"),
])
def test_bad_cell_names_file_row_and_column(tmp_path, column, value, problem):
    message = _error(_write_segments(tmp_path, _with_cell(1, column, value)))
    assert f"row 2 (narration_id 'P01_01_1'), column '{column}': {problem}" in message


def test_duplicate_narration_id(tmp_path):
    message = _error(_write_segments(tmp_path, _with_cell(2, "narration_id", "P01_01_0")))
    assert "row 3 (narration_id 'P01_01_0'), column 'narration_id': duplicate narration_id 'P01_01_0'" in message
    assert "first seen in row 1" in message


def test_first_bad_row_and_count_of_others(tmp_path):
    rows = [list(row) for row in ROWS]
    for row, value in zip(rows, "abc"):
        row[COLUMN["start_frame"]] = value
    message = _error(_write_segments(tmp_path, rows))
    assert "row 1 (narration_id 'P01_01_0'), column 'start_frame': 'a' is not a non-negative integer" in message
    assert "(and 2 other rows)" in message


def test_row_number_counts_rows_not_lines(tmp_path):
    # A quoted narration spanning two lines is still one row: the bad row is data row 3, on line 5 of the file.
    rows = _with_cell(1, "narration", '"take\ncup"')
    rows[2][COLUMN["stop_frame"]] = "1524"
    message = _error(_write_segments(tmp_path, rows))
    assert "row 3 (narration_id 'P02_03_7'), column 'stop_frame'" in message


def test_missing_columns(tmp_path):
    header = HEADER.replace("stop_frame,", "").replace(",noun_class", "")
    dropped = (COLUMN["stop_frame"], COLUMN["noun_class"])
    rows = [[cell for i, cell in enumerate(row) if i not in dropped] for row in ROWS]
    message = _error(_write_segments(tmp_path, rows, header=header))
    assert "missing column(s) 'stop_frame', 'noun_class'" in message


def test_labelled_read_of_test_file_hints_labelled_false(tmp_path):
    header = ",".join(HEADER.split(",")[:8])
    path = _write_segments(tmp_path, [row[:8] for row in ROWS], header=header, name="EPIC_100_test_timestamps.csv")
    message = _error(path)
    assert "missing column(s) 'verb_class', 'noun_class'" in message and "labelled=False" in message
    test = read_segments(path, labelled=False)
    assert len(test) == 3 and "verb_class" not in test.columns


def test_class_ids_unchecked_without_tables(tmp_path):
    segments = read_segments(_write_segments(tmp_path, _with_cell(0, "verb_class", "500")), labelled=True)
    assert segments["verb_class"].tolist() == [500, 0, 2]


def test_header_only_file_gives_empty_typed_frame(tmp_path):
    segments = read_segments(_write_segments(tmp_path, rows=[]), labelled=True, verbs=VERBS, nouns=NOUNS)
    assert len(segments) == 0 and segments["start_sec"].dtype == np.float64
    info_path = tmp_path / "EPIC_100_video_info.csv"
    info_path.write_text("video_id,duration,fps,resolution\n")
    info = read_video_info(info_path)
    assert len(info) == 0 and info["fps"].dtype == np.float64 and info["width"].dtype == np.int64


@pytest.mark.parametrize("content, problem", [
    (None, "file not found"),
    (b"", "file is empty"),
    (b"   \n\n", "file is empty"),
    (b"PK\x03\x04\x00\x00binary zip", "binary file"),
    (HEADER.encode() + b"\nP01_01_0,P01,caf\xe9\n", "not UTF-8"),
    (HEADER.encode() + b"\n" + ",".join(ROWS[0]).encode() + b",extra,cells\n", "more fields than the header"),
    ("\n".join([HEADER] + [",".join(r) for r in ROWS]).encode() + b",extra\n", "Expected 13 fields in line 4"),
    (b'{"narration_id": "P01_01_0"}\n', "missing column(s) 'narration_id'"),
])
def test_unreadable_files(tmp_path, content, problem):
    path = tmp_path / "EPIC_100_validation.csv"
    if content is not None:
        path.write_bytes(content)
    assert problem in _error(path)


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / "EPIC_100_validation.csv"
    folder.mkdir()
    assert "is a directory" in _error(folder)


def test_utf8_bom_is_accepted(tmp_path):
    path = _write_segments(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_segments(path, labelled=True)["narration_id"].iloc[0] == "P01_01_0"


# ----------------------------------------------------------------------------------------------------------------
# Class tables, video info and the annotation folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_class_table_reads_quoted_lists_in_id_order(tmp_path):
    path = _write(tmp_path / "verbs.csv", 'id,key,instances,category\n1,open,"[\'open\', \'open-up\']",access\n'
                                          '0,take,"[\'take\',\n \'grab\']",retrieve\n')
    assert read_class_table(path, "verb") == ClassTable(keys=("take", "open"), name="verb")


@pytest.mark.parametrize("rows, problem", [
    ("0,take\n2,open\n", "row 2, column 'id': id 2 leaves a gap: 2 classes need ids 0..1"),
    ("0,take\n0,open\n", "row 2, column 'id': duplicate id '0' (first seen in row 1)"),
    ("0,take\n1,take\n", "row 2, column 'key': duplicate key 'take'"),
    ("0,take\nx,open\n", "row 2, column 'id': 'x' is not a non-negative integer"),
])
def test_bad_class_tables(tmp_path, rows, problem):
    path = _write(tmp_path / "EPIC_100_verb_classes.csv", "id,key\n" + rows)
    with pytest.raises(AnnotationError) as info:
        read_class_table(path, "verb")
    assert "EPIC_100_verb_classes.csv" in str(info.value) and problem in str(info.value)


@pytest.mark.parametrize("row, problem", [
    ("P01_02,10.5,50,1920x", "row 2 (video_id 'P01_02'), column 'resolution': '1920x' is not WIDTHxHEIGHT"),
    ("P01_02,10.5,fast,1920x1080", "row 2 (video_id 'P01_02'), column 'fps': 'fast' is not a positive number"),
    ("P01_02,-1,50,1920x1080", "row 2 (video_id 'P01_02'), column 'duration': '-1' is not a positive number"),
    ("P01_01,10.5,50,1920x1080", "row 2 (video_id 'P01_01'), column 'video_id': duplicate video_id 'P01_01'"),
])
def test_bad_video_info(tmp_path, row, problem):
    header_and_first_row = "video_id,duration,fps,resolution\nP01_01,1.0,59.94,640x360\n"
    path = _write(tmp_path / "EPIC_100_video_info.csv", f"{header_and_first_row}{row}\n")
    with pytest.raises(AnnotationError) as info:
        read_video_info(path)
    assert "EPIC_100_video_info.csv" in str(info.value) and problem in str(info.value)


def _tiny_folder(tmp_path: Path) -> Path:
    root = tmp_path / "annotations"
    root.mkdir()
    _write(root / "EPIC_100_verb_classes.csv", "id,key,instances,category\n0,take,[],a\n1,open,[],b\n2,put,[],c\n")
    _write(root / "EPIC_100_noun_classes.csv", "id,key,instances,category\n0,door,[],a\n1,cup,[],b\n")
    _write_segments(root, ROWS[:2], name="EPIC_100_train.csv")
    _write_segments(root, ROWS[2:], name="EPIC_100_validation.csv")
    return root


def test_annotation_folder_without_optional_files(tmp_path):
    epic = EpicAnnotations(_tiny_folder(tmp_path))
    assert epic.tail_verbs is None and epic.tail_nouns is None
    assert epic.unseen_participants("validation") is None
    assert epic.segments("train+validation")["narration_id"].tolist() == ["P01_01_0", "P01_01_1", "P02_03_7"]
    with pytest.raises(AnnotationError, match="EPIC_100_test_timestamps.csv: file not found"):
        epic.segments("test")
    with pytest.raises(AnnotationError, match="EPIC_100_video_info.csv: file not found"):
        epic.video_info


def test_annotation_folder_checks_classes_against_its_tables(tmp_path):
    root = _tiny_folder(tmp_path)
    _write(root / "EPIC_100_tail_verbs.csv", "verb\n0\n7\n")
    epic = EpicAnnotations(root)
    assert epic.segments("validation")["noun_class"].tolist() == [1]
    _write_segments(root, _with_cell(2, "noun_class", "2")[2:], name="EPIC_100_validation.csv")
    with pytest.raises(AnnotationError, match=r"row 1 \(narration_id 'P02_03_7'\), column 'noun_class': noun class 2"):
        EpicAnnotations(root).segments("validation")
    with pytest.raises(AnnotationError, match=r"EPIC_100_tail_verbs.csv: row 2, column 'verb': verb class 7 is out"):
        epic.tail_verbs


def test_missing_annotation_folder(tmp_path):
    with pytest.raises(AnnotationError, match="annotations folder not found"):
        EpicAnnotations(tmp_path / "nope")
