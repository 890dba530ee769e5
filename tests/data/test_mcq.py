"""MCQ loading: local json / jsonl / parquet files, validation errors naming file, row and field."""

from __future__ import annotations

import json

import pytest

from alter_jax.data.mcq import MCQDataError, MCQItem, items_from_rows, load_mcq, load_mcq_file, subject_topic

ROWS = [
    {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "elementary_mathematics"},
    {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": "B"},
]


def test_json_jsonl_parquet_same_items(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "q.json").write_text(json.dumps(ROWS))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    rows_pq = [dict(r, answer=1, subject=r.get("subject", "")) for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows_pq), tmp_path / "q.parquet")
    a = load_mcq_file(tmp_path / "q.json")
    b = load_mcq(str(tmp_path / "q.jsonl"))
    c = load_mcq(tmp_path / "q.parquet")
    expected = [
        MCQItem(" What is 2+2? ", ("3", "4", "5", "6"), 1, "elementary_mathematics"),
        MCQItem("Capital of France?", ("Rome", "Paris", "Oslo", "Bern"), 1, "q"),  # subject <- file stem
    ]
    assert a == expected and b == expected and c == expected
    assert load_mcq(tmp_path / "q.json", limit=1) == expected[:1]


def test_json_wrapped_in_data_key(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS}))
    assert len(load_mcq_file(tmp_path / "w.json", subject="s")) == 2
    assert load_mcq_file(tmp_path / "w.json", subject="s")[1].subject == "s"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"question": "q", "choices": ["a", "b", "c"], "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}, "answer"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}, "answer"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": True}, "answer"),
        ({"question": "", "choices": ["a", "b", "c", "d"], "answer": 0}, "question"),
        ({"question": "q", "choices": ["a", 2, "c", "d"], "answer": 0}, "choices[1]"),
        ({"question": "q", "choices": "abcd", "answer": 0}, "choices"),
        ({"question": "q", "answer": 0}, "missing field"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": 3}, "subject"),
    ],
)
def test_bad_rows_name_file_row_field(tmp_path, row, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[1]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(MCQDataError) as e:
        load_mcq_file(path)
    msg = str(e.value)
    assert str(path) in msg and "row 1" in msg and field in msg


def test_file_errors(tmp_path):
    with pytest.raises(MCQDataError, match="file not found"):
        load_mcq_file(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(MCQDataError, match="invalid JSON"):
        load_mcq_file(tmp_path / "x.json")
    (tmp_path / "x.jsonl").write_text('{"question": "q"}\n{oops\n')
    with pytest.raises(MCQDataError, match="line 2"):
        load_mcq_file(tmp_path / "x.jsonl")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(MCQDataError, match="no questions"):
        load_mcq_file(tmp_path / "e.json")
    with pytest.raises(MCQDataError, match="unknown MCQ source"):
        load_mcq("wmdp-physics")


def test_subject_topics_match_harness_descriptions():
    assert subject_topic("wmdp-bio") == "biology"
    assert subject_topic("wmdp-cyber") == "cybersecurity"
    assert subject_topic("high_school_us_history") == "high school us history"
    assert subject_topic("") == ""


def test_hub_style_rows_numpy_choices():
    import numpy as np

    rows = [{"question": "q", "choices": np.array(["a", "b", "c", "d"]), "answer": np.int64(3)}]
    (item,) = items_from_rows(rows, "hub", default_subject="wmdp-bio")
    assert item == MCQItem("q", ("a", "b", "c", "d"), 3, "wmdp-bio")
