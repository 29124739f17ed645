"""Manifests (finetune/data/manifest.py): each file format, the columns, the labels, the rows left
out and why; and the multi-label validation split (finetune/data/multilabel_split.py)."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.data.bad_images import BadFiles, BadImageError, Problem
from finetune.data.manifest import Entry, count_labels, parse_manifest, read_table
from finetune.data.multilabel_split import iterative_split
from finetune.errors import FinetuneError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def parse(rows, base=Path("/data"), source="labels.csv", **settings):
    return parse_manifest(rows, source, base, **settings)


def rows_of(*rows: dict) -> list[dict]:
    return [{**row, "_line": number} for number, row in enumerate(rows, start=2)]


def reasons(manifest) -> dict[str, str]:
    return {problem.path: problem.reason for problem in manifest.problems}


# ---- reading each format ------------------------------------------------------------------

def test_csv_rows_keep_their_file_line(tmp_path):
    path = write(tmp_path / "labels.csv", "path,label\na.jpg,cat\n\nb.jpg,dog\n")
    assert read_table(path) == [{"path": "a.jpg", "label": "cat", "_line": 2},
                                {"path": "b.jpg", "label": "dog", "_line": 4}]


def test_csv_with_a_byte_order_mark_names_its_first_column_plainly(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfpath,label\na.jpg,cat\n")
    assert read_table(path) == [{"path": "a.jpg", "label": "cat", "_line": 2}]


@pytest.mark.parametrize("suffix", [".tsv", ".tab", ".TSV"])
def test_tab_separated(tmp_path, suffix):
    path = write(tmp_path / f"labels{suffix}", "image\ttags\na b.jpg\tcat, small\n")
    assert read_table(path) == [{"image": "a b.jpg", "tags": "cat, small", "_line": 2}]


def test_jsonl_keeps_value_types_and_skips_blank_lines(tmp_path):
    text = '{"path": "a.jpg", "labels": ["cat", "dog"]}\n\n  \n{"path": "b.jpg", "labels": 3}\n'
    path = write(tmp_path / "labels.jsonl", text)
    assert read_table(path) == [{"path": "a.jpg", "labels": ["cat", "dog"], "_line": 1},
                                {"path": "b.jpg", "labels": 3, "_line": 4}]
    assert read_table(write(tmp_path / "labels.ndjson", '{"path": "c.jpg"}\n')) == [{"path": "c.jpg", "_line": 1}]


def test_jsonl_line_that_is_not_an_object_is_one_line_naming_file_and_line(tmp_path):
    path = write(tmp_path / "labels.jsonl", '{"path": "a.jpg", "label": "cat"}\n["b.jpg", "dog"]\n')
    not_an_object = r"^data\.manifest: .*labels\.jsonl:2 is a JSON list, not an object; "
    with pytest.raises(FinetuneError, match=not_an_object) as error:
        read_table(path)
    assert "\n" not in str(error.value)
    path = write(tmp_path / "broken.jsonl", '{"path": "a.jpg"}\n\n{"path": "b.jpg",\n')
    with pytest.raises(FinetuneError, match=r"^data\.manifest: .*broken\.jsonl:3 is not JSON \("):
        read_table(path)


def test_parquet_keeps_lists_and_numbers_rows(tmp_path):
    path = tmp_path / "labels.parquet"
    table = pa.table({"path": ["a.jpg", "b.jpg"], "labels": [["cat"], ["cat", "dog"]], "score": [1.5, 2.0]})
    pq.write_table(table, path)
    assert read_table(path) == [{"path": "a.jpg", "labels": ["cat"], "score": 1.5, "_line": 1},
                                {"path": "b.jpg", "labels": ["cat", "dog"], "score": 2.0, "_line": 2}]
    manifest = parse(read_table(path), source="labels.parquet")
    assert manifest.multilabel and manifest.class_names == ["cat", "dog"]
    assert [e.labels for e in manifest.entries] == [(0,), (0, 1)]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "label": ["cat"]}), path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FinetuneError) as error:
        read_table(path)
    assert str(error.value) == "data.manifest: reading Parquet needs pyarrow; pip install 'finetune[parquet]'"


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    unreadable = r"^data\.manifest: .*fake\.parquet is not a readable Parquet file \([^\n]*$"
    with pytest.raises(FinetuneError, match=unreadable):
        read_table(write(tmp_path / "fake.parquet", "path,label\n"))


@pytest.mark.parametrize("name, text, message", [
    ("labels.txt", "path,label\n", r"labels\.txt has suffix '\.txt'; a manifest is \.csv, \.tsv, \.tab, \.jsonl, "
                                   r"\.ndjson, \.parquet$"),
    ("labels", "path,label\n", r"labels has suffix '\(none\)'"),
    ("empty.csv", "", r"empty\.csv is empty; its first line must name the columns"),
    ("blank.tsv", "\n\n", r"blank\.tsv is empty"),
    ("empty.jsonl", "\n \n", r"empty\.jsonl is empty; write one JSON object per line"),
])
def test_unusable_files_are_one_line_naming_them(tmp_path, name, text, message):
    with pytest.raises(FinetuneError, match=r"^data\.manifest: ") as error:
        read_table(write(tmp_path / name, text))
    assert "\n" not in str(error.value)
    assert str(tmp_path / name) in str(error.value)
    assert re.search(message, str(error.value))


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"^data\.manifest: .*nothere\.csv does not exist; "):
        read_table(tmp_path / "nothere.csv")


# ---- paths ---------------------------------------------------------------------------------

def test_relative_paths_resolve_against_base_absolute_and_home_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "labels.csv",
                 f"path,label\nimgs/a.jpg,cat\n./imgs/../b.jpg,dog\n{tmp_path / 'abs.jpg'},cat\n~/c.jpg,dog\n7,cat\n")
    manifest = parse(read_table(path), base=tmp_path / "root")
    assert [e.path for e in manifest.entries] == [
        str(tmp_path / "root" / "imgs" / "a.jpg"), str(tmp_path / "root" / "b.jpg"), str(tmp_path / "abs.jpg"),
        str(tmp_path / "home" / "c.jpg"), str(tmp_path / "root" / "7"),
    ]
    assert [e.line for e in manifest.entries] == [2, 3, 4, 5, 6]
    assert manifest.problems == []


def test_files_are_not_checked(tmp_path):
    manifest = parse(rows_of({"path": "missing.jpg", "label": "cat"}), base=tmp_path)
    assert manifest.entries == [Entry(str(tmp_path / "missing.jpg"), (0,), None, 2)]


# ---- labels --------------------------------------------------------------------------------

def test_single_label_classes_sorted_like_folders():
    manifest = parse(rows_of({"path": "a", "label": "dog"}, {"path": "b", "label": " cat "},
                             {"path": "c", "label": "Bird"}, {"path": "d", "label": "sea lion"}))
    assert not manifest.multilabel
    assert manifest.class_names == ["Bird", "cat", "dog", "sea lion"]  # plain str sort; a space is no delimiter
    assert [e.labels for e in manifest.entries] == [(2,), (1,), (0,), (3,)]


@pytest.mark.parametrize("delimiter", [";", "|"])
def test_delimiter_detected(delimiter):
    manifest = parse(rows_of({"path": "a", "labels": f"dog{delimiter} cat"}, {"path": "b", "labels": "cat"},
                             {"path": "c", "labels": f"bird{delimiter}{delimiter}"}))
    assert manifest.multilabel
    assert manifest.class_names == ["bird", "cat", "dog"]
    assert [e.labels for e in manifest.entries] == [(1, 2), (1,), (0,)]


def test_semicolon_wins_over_bar():
    manifest = parse(rows_of({"path": "a", "labels": "a|b;c"}, {"path": "b", "labels": "d"}))
    assert manifest.class_names == ["a|b", "c", "d"]


def test_explicit_space_delimiter():
    rows = rows_of({"path": "a", "tags": "cat  dog"}, {"path": "b", "tags": "dog"})
    assert parse(rows).class_names == ["cat  dog", "dog"]
    manifest = parse(rows, label_delimiter=" ")
    assert manifest.multilabel and manifest.class_names == ["cat", "dog"]
    assert [e.labels for e in manifest.entries] == [(0, 1), (1,)]


def test_jsonl_lists_and_numbers(tmp_path):
    path = write(tmp_path / "labels.jsonl", "\n".join(json.dumps(row) for row in [
        {"file": "a.jpg", "labels": ["cat", "dog"]}, {"file": "b.jpg", "labels": ["dog"]},
        {"file": "c.jpg", "labels": [3, 3.0, " "]}, {"file": "d.jpg", "labels": 2.5},
    ]))
    manifest = parse(read_table(path), base=tmp_path)
    assert manifest.multilabel and manifest.columns["path"] == "file"
    assert manifest.class_names == ["2.5", "3", "cat", "dog"]
    assert [e.labels for e in manifest.entries] == [(2, 3), (3,), (1,), (0,)]


def test_single_item_lists_are_single_label():
    assert not parse(rows_of({"path": "a", "label": ["cat"]}, {"path": "b", "label": ["dog"]})).multilabel


def test_one_hot_columns(tmp_path):
    path = write(tmp_path / "labels.csv",
                 "path,dog,cat,note\na,1,0,x\nb,true,Yes,x\nc,0,,x\nd,1.0,0.0,x\ne,no,FALSE,x\nf,2,1,x\n")
    manifest = parse(read_table(path), label_columns=["dog", "cat"])
    assert manifest.multilabel and manifest.class_names == ["dog", "cat"]
    assert manifest.columns == {"path": "path", "label": None, "labels": ["dog", "cat"], "split": None}
    assert [e.labels for e in manifest.entries] == [(0,), (0, 1), (), (0,), ()]  # rows of zeros: images with no label
    assert reasons(manifest) == {
        "labels.csv:7": "column 'dog' has '2'; one-hot columns take 1/0, true/false or yes/no (empty is 0)"
    }


def test_one_hot_json_values():
    rows = rows_of({"path": "a", "x": True, "y": 0}, {"path": "b", "x": 0.0, "y": 1})
    manifest = parse(rows, label_columns=["x", "y"])
    assert [e.labels for e in manifest.entries] == [(0,), (1,)]


def test_one_hot_single_label_wants_exactly_one():
    rows = rows_of({"path": "a", "x": 1, "y": 0}, {"path": "b", "x": 1, "y": 1}, {"path": "c", "x": 0, "y": 0})
    manifest = parse(rows, label_columns=["x", "y"], multilabel=False)
    assert not manifest.multilabel and [e.labels for e in manifest.entries] == [(0,)]
    assert set(reasons(manifest).values()) == {
        f"{n} labels in the one-hot columns but data.multilabel is false; set exactly one column to 1, or set "
        "data.multilabel true" for n in (2, 0)
    }


def test_classes_keep_their_order_and_leave_out_unknown_labels():
    rows = rows_of({"path": "a", "label": "dog"}, {"path": "b", "label": "cat"}, {"path": "c", "label": "cow"})
    manifest = parse(rows, classes=["dog", "cat", "bird"])
    assert manifest.class_names == ["dog", "cat", "bird"]
    assert [e.labels for e in manifest.entries] == [(0,), (1,)]
    assert reasons(manifest) == {"labels.csv:4": "label 'cow' is not in data.classes; add it to data.classes"}


def test_classes_listed_twice_is_an_error():
    with pytest.raises(FinetuneError, match=r"^data\.classes: 'cat' is listed more than once"):
        parse(rows_of({"path": "a", "label": "cat"}), classes=["cat", "dog", "cat"])


def test_multilabel_false_leaves_out_rows_of_several_labels():
    manifest = parse(rows_of({"path": "a", "label": "dog;cat"}, {"path": "b", "label": "cat"}), multilabel=False)
    assert not manifest.multilabel and manifest.class_names == ["cat"]
    assert reasons(manifest) == {"labels.csv:2": "2 labels but data.multilabel is false ('dog', 'cat'); give one "
                                                 "label, or set data.multilabel true"}


def test_multilabel_true_without_a_delimiter_keeps_single_labels():
    manifest = parse(rows_of({"path": "a", "label": "dog"}, {"path": "b", "label": "cat"}), multilabel=True)
    assert manifest.multilabel and [e.labels for e in manifest.entries] == [(1,), (0,)]


# ---- splits --------------------------------------------------------------------------------

def test_split_values_and_their_aliases():
    values = ["train", " Training", "val", "VALID", "validation", "dev", "test", "testing", "", None]
    manifest = parse(rows_of(*({"path": str(i), "label": "x", "Subset": v} for i, v in enumerate(values))))
    assert manifest.columns["split"] == "Subset"
    splits = ["train", "train", "val", "val", "val", "val", "test", "test", None, None]
    assert [e.split for e in manifest.entries] == splits


def test_no_split_column_leaves_every_split_to_the_datamodule():
    manifest = parse(rows_of({"path": "a", "label": "x"}))
    assert manifest.columns["split"] is None and manifest.entries[0].split is None


# ---- columns -------------------------------------------------------------------------------

def test_columns_detected_case_insensitively_first_candidate_wins():
    rows = rows_of({"Filename": "a", "IMAGE": "b", "Category": "x", "Tags": "y", "Partition": "val", "other": 1})
    manifest = parse(rows)
    assert manifest.columns == {"path": "IMAGE", "label": "Tags", "labels": None, "split": "Partition"}
    assert manifest.entries == [Entry("/data/b", (0,), "val", 2)]
    assert manifest.class_names == ["y"]


def test_named_columns():
    rows = rows_of({"path": "a", "src": "b", "label": "x", "kind": "y", "split": "val", "fold": "train"})
    manifest = parse(rows, path_column="src", label_column="KIND", split_column="fold")
    assert manifest.columns == {"path": "src", "label": "kind", "labels": None, "split": "fold"}
    assert manifest.entries == [Entry("/data/b", (0,), "train", 2)]


@pytest.mark.parametrize("setting, key", [
    ({"path_column": "x"}, "path_column"), ({"label_column": "x"}, "label_column"),
    ({"label_columns": ["a", "x"]}, "label_columns"), ({"split_column": "x"}, "split_column"),
])
def test_a_missing_named_column_lists_the_columns(tmp_path, setting, key):
    rows = read_table(write(tmp_path / "labels.csv", "a,b,c\n1,2,3\n"))
    if key != "path_column":
        setting = {**setting, "path_column": "a"}
    if key == "split_column":
        setting["label_column"] = "b"
    with pytest.raises(FinetuneError) as error:
        parse(rows, **setting)
    assert str(error.value) == f"data.{key}: manifest labels.csv has no column 'x'; its columns are a, b, c"


def test_no_path_or_label_column_found():
    with pytest.raises(FinetuneError, match=r"^data\.path_column: manifest labels\.csv has none of the columns path, "
                                            r"image, .*; its columns are name, label; name the column with "
                                            r"data\.path_column$"):
        parse(rows_of({"name": "a", "label": "x"}))
    with pytest.raises(FinetuneError, match=r"^data\.label_column: .*its columns are path, kind; name the column"):
        parse(rows_of({"path": "a", "kind": "x"}))


# ---- rows left out -------------------------------------------------------------------------

def test_every_kind_of_bad_row_is_a_problem_with_its_reason(tmp_path):
    path = write(tmp_path / "labels.csv", "\n".join([
        "path,label,split",
        "a.jpg,cat,train",        # 2 good
        "b.jpg,,train",           # 3 no label
        "c.jpg, ; ,train",        # 4 only delimiters: no label
        ",cat,train",             # 5 empty path
        "d.jpg,cat,holdout",      # 6 unknown split
        "./a.jpg,dog,val",        # 7 same image as line 2
        "e.jpg,cat,val,extra",    # 8 more values than columns
        "f.jpg,dog",              # 9 fewer values: no split, fine
        "g.jpg,dog,val,,",        # 10 trailing delimiters: fine
    ]) + "\n")
    manifest = parse(read_table(path), base=tmp_path)
    assert [e.line for e in manifest.entries] == [2, 9, 10]
    assert manifest.entries[1] == Entry(str(tmp_path / "f.jpg"), (1,), None, 9)
    assert manifest.problems == [
        Problem("labels.csv:3", "no label in column 'label'; give the image its label(s)", "row"),
        Problem("labels.csv:4", "no label in column 'label'; give the image its label(s)", "row"),
        Problem("labels.csv:5", "empty path in column 'path'; give the image's path", "row"),
        Problem("labels.csv:6", "split 'holdout' is not one of train, training, val, valid, validation, dev, test, "
                                "testing (or empty, to let data.val_fraction split the row)", "row"),
        Problem("labels.csv:7", "same image as line 2; remove one of the rows", "row"),
        Problem("labels.csv:8", "4 values but the header has 3 columns; quote values that contain the delimiter",
                "row"),
    ]


def test_a_bad_row_does_not_make_a_later_copy_a_duplicate():
    manifest = parse(rows_of({"path": "a", "label": "x", "split": "nope"}, {"path": "a", "label": "x", "split": "val"}))
    assert [e.line for e in manifest.entries] == [3]


def test_bad_rows_go_through_bad_files_like_bad_images():
    manifest = parse(rows_of({"path": "a", "label": "x"}, {"path": "b", "label": ""}, {"path": "", "label": "x"}))
    skip = BadFiles("skip")
    skip.reject(manifest.problems)
    assert skip.as_rows()[0] == {"path": "labels.csv:3", "reason": "no label in column 'label'; give the image its "
                                 "label(s)", "kind": "row", "found": "setup"}
    with pytest.raises(BadImageError, match=r"^labels\.csv:3: no label in column 'label'; .* \(1 more unusable files"):
        BadFiles("raise").reject(manifest.problems)


def test_no_usable_row_is_one_line():
    with pytest.raises(FinetuneError) as error:
        parse(rows_of({"path": "a", "label": ""}, {"path": "b", "label": "x", "split": "?"}))
    assert str(error.value) == ("data.manifest: labels.csv has no usable row (2 bad: labels.csv:2: no label in column "
                                "'label'; give the image its label(s))")
    with pytest.raises(FinetuneError, match=r"^data\.manifest: labels\.csv has no rows"):
        parse([])


def test_count_labels():
    entries = [Entry("a", (0, 2), None, 2), Entry("b", (2,), None, 3), Entry("c", (), None, 4)]
    assert count_labels(entries, 4) == [1, 0, 2, 0]


# ---- the multi-label split -----------------------------------------------------------------

def synthetic_label_sets(n: int, num_classes: int, seed: int) -> list[tuple[int, ...]]:
    """Long-tailed labels, one to three per example, some examples with none."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(num_classes)]
    return [tuple(sorted(set(rng.choices(range(num_classes), weights, k=rng.choice([0, 1, 1, 2, 3])))))
            for _ in range(n)]


def val_share_error(label_sets, val, num_classes, fraction) -> float:
    """Mean over labels of |share of the label's examples in val - fraction|."""
    in_val = set(val)
    total, held = [0] * num_classes, [0] * num_classes
    for i, labels in enumerate(label_sets):
        for label in labels:
            total[label] += 1
            held[label] += i in in_val
    present = [k for k in range(num_classes) if total[k]]
    return sum(abs(held[k] / total[k] - fraction) for k in present) / len(present)


@pytest.mark.parametrize("n, fraction", [(10, 0.2), (37, 0.25), (101, 0.1), (50, 0.5), (50, 0.2), (300, 0.2)])
@pytest.mark.parametrize("unlabelled", [True, False])  # without unlabelled examples to even them out, sizes are moved
def test_split_sizes_and_indices(n, fraction, unlabelled):
    label_sets = [s for s in synthetic_label_sets(2 * n, 6, seed=n) if unlabelled or s][:n]
    train, val = iterative_split(label_sets, 6, fraction, seed=0)
    assert abs(len(val) - fraction * n) <= 1
    assert train == sorted(train) and val == sorted(val)
    assert sorted(train + val) == list(range(n))


def test_every_label_of_two_or_more_examples_is_in_both_parts():
    # Four rare labels (1, 2, 3, 5: two examples each) beside common ones. With 25% held out (5 of 20) each gets
    # one in val and one in train; with 10% (2 of 20) too: the labels win over the size, which needs 4 in val.
    label_sets = [(0,), (0, 1), (0,), (0, 2), (0,), (0, 3), (0,), (0,), (1, 4), (2,), (3, 4), (4,), (4, 5), (5,),
                  (0, 4), (0,), (4,), (), (0, 4), (6,)]
    for fraction in (0.25, 0.1):
        for seed in range(20):
            train, val = iterative_split(label_sets, 7, fraction, seed)
            assert len(val) == 5 if fraction == 0.25 else len(val) >= 4
            for label in range(6):  # label 6 has one example: it can only be in one part
                assert any(label in label_sets[i] for i in val), (fraction, seed, label)
                assert any(label in label_sets[i] for i in train), (fraction, seed, label)


def test_label_shares_closer_to_the_fraction_than_a_random_split():
    label_sets = synthetic_label_sets(400, 12, seed=1)
    stratified, shuffled = [], []
    for seed in range(4):
        _, val = iterative_split(label_sets, 12, 0.2, seed)
        order = list(range(len(label_sets)))
        random.Random(seed).shuffle(order)
        stratified.append(val_share_error(label_sets, val, 12, 0.2))
        shuffled.append(val_share_error(label_sets, order[:len(val)], 12, 0.2))
    assert sum(stratified) / 4 < 0.5 * sum(shuffled) / 4, (stratified, shuffled)


def test_split_is_deterministic_for_a_seed_and_differs_for_another():
    label_sets = synthetic_label_sets(200, 8, seed=3)
    assert iterative_split(label_sets, 8, 0.2, seed=5) == iterative_split(label_sets, 8, 0.2, seed=5)
    assert iterative_split(label_sets, 8, 0.2, seed=5)[1] != iterative_split(label_sets, 8, 0.2, seed=6)[1]


def test_no_validation_fraction_keeps_all_for_training():
    assert iterative_split([(0,), (1,), (0, 1)], 2, 0.0, seed=0) == ([0, 1, 2], [])
    assert iterative_split([], 2, 0.2, seed=0) == ([], [])
