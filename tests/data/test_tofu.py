"""TOFU loader: schemas, clear errors for bad inputs, author blocks, pairing/batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alter_jax.data.batching import collate, forget_retain_batches, iterate_batches, pair_forget_retain
from alter_jax.data.synthetic import write_tofu_folder
from alter_jax.data.tofu import (
    EVAL_TASKS,
    TofuDataError,
    author_blocks,
    load_idk,
    load_tofu_split,
    retain_split_for,
    split_kind,
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_real_tofu_splits(tofu_dir):
    full = load_tofu_split("full", tofu_dir)
    assert len(full) == 4000 and set(full[0]) == {"question", "answer"}
    blocks = author_blocks(full)
    assert len(blocks) == 200 and all(len(b) == 20 for b in blocks)
    f10 = load_tofu_split("forget10_perturbed", tofu_dir)
    assert len(f10) == 400 and len(f10[0]["perturbed_answer"]) == 5 and "paraphrased_question" in f10[0]
    # forget10 is the last 20 authors of full
    assert [r["question"] for r in f10] == [r["question"] for r in full[-400:]]
    ra = load_tofu_split("real_authors_perturbed", tofu_dir)
    assert len(ra) == 100 and len(ra[0]["perturbed_answer"]) == 3
    assert len(load_tofu_split("world_facts_perturbed", tofu_dir)) == 117
    assert len(load_idk(tofu_dir)) == 100
    assert retain_split_for("forget10") == "retain90" and retain_split_for("forget01_perturbed") == "retain99"
    for split in EVAL_TASKS.values():
        assert len(load_tofu_split(split.format(forget="forget05"), tofu_dir)) > 0


def test_missing_split_lists_available(tmp_path):
    _write(tmp_path / "forget10.json", [{"question": "q", "answer": "a"}])
    _write(tmp_path / "retain90.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(TofuDataError, match=r"split 'forget05' not found in .*available splits: forget10, retain90"):
        load_tofu_split("forget05", tmp_path)
    with pytest.raises(TofuDataError, match="does not exist"):
        load_tofu_split("forget10", tmp_path / "nope")


def test_row_without_answer(tmp_path):
    _write(tmp_path / "forget10.json", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(TofuDataError, match=r"forget10.json, row 1: missing field 'answer'"):
        load_tofu_split("forget10", tmp_path)


def test_perturbed_wrong_length(tmp_path):
    row = {"question": "q", "answer": "a", "paraphrased_answer": "p", "paraphrased_question": "pq",
           "perturbed_answer": ["x"] * 5}
    _write(tmp_path / "forget10_perturbed.json", [row, {**row, "perturbed_answer": ["x"] * 4}])
    with pytest.raises(TofuDataError, match=r"row 1: field 'perturbed_answer' has 4 answers, expected 5"):
        load_tofu_split("forget10_perturbed", tmp_path)
    with pytest.raises(TofuDataError, match=r"row 0: field 'perturbed_answer' has 5 answers, expected 4"):
        load_tofu_split("forget10_perturbed", tmp_path, num_perturbed=4)
    _write(tmp_path / "real_authors_perturbed.json", [{"question": "q", "answer": "a", "perturbed_answer": ["x"] * 5}])
    with pytest.raises(TofuDataError, match="has 5 answers, expected 3"):
        load_tofu_split("real_authors_perturbed", tmp_path)
    _write(tmp_path / "retain_perturbed.json", [{"question": "q", "answer": "a", "perturbed_answer": ["x"] * 5}])
    with pytest.raises(TofuDataError, match="missing field 'paraphrased_answer'"):
        load_tofu_split("retain_perturbed", tmp_path)


def test_empty_and_broken_files(tmp_path):
    (tmp_path / "forget10.json").write_text("")
    with pytest.raises(TofuDataError, match=r"forget10.json is empty"):
        load_tofu_split("forget10", tmp_path)
    (tmp_path / "retain90.json").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(TofuDataError, match=r"retain90.json, line 2: not valid JSON"):
        load_tofu_split("retain90", tmp_path)


def test_author_blocks_errors():
    with pytest.raises(TofuDataError, match="not a whole number of authors"):
        author_blocks([{}] * 30, per_author=20)
    assert split_kind("world_facts_perturbed") == "real" and split_kind("forget01") == "plain"


def test_synthetic_folder_roundtrip_and_pairing(tmp_path):
    names = write_tofu_folder(tmp_path, num_authors=5, forget_authors=1, seed=3, per_author=4)
    assert names["forget"] == "forget20" and names["retain"] == "retain80"
    full = load_tofu_split("full", tmp_path)
    forget = load_tofu_split("forget20_perturbed", tmp_path)
    retain = load_tofu_split("retain80", tmp_path)
    assert len(full) == 20 and len(forget) == 4 and len(retain) == 16
    assert [r["question"] for r in forget] == [r["question"] for r in full[-4:]]
    assert len(load_tofu_split("retain_perturbed", tmp_path)) == 4
    assert len(load_tofu_split("real_authors_perturbed", tmp_path)[0]["perturbed_answer"]) == 3
    assert len(author_blocks(full, per_author=4)) == 5

    # pairing: seeded, uniform over retain, different per epoch
    p0 = pair_forget_retain(400, 3600, seed=1, epoch=0)
    assert np.array_equal(p0, pair_forget_retain(400, 3600, seed=1, epoch=0))
    assert not np.array_equal(p0, pair_forget_retain(400, 3600, seed=1, epoch=1))
    assert p0.min() >= 0 and p0.max() < 3600
    fa = {"input_ids": np.arange(10, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32)}
    ra = {"input_ids": 100 + np.arange(7, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32)}
    seen = []
    for b in forget_retain_batches(fa, ra, batch_size=4, seed=0):
        assert b["forget"]["input_ids"].shape[0] == b["retain"]["input_ids"].shape[0]
        seen += b["forget"]["input_ids"][:, 0].tolist()
    assert sorted(seen) == list(range(10))
    assert [len(b["input_ids"]) for b in iterate_batches(fa, 4, drop_last=True)] == [4, 4]
    c = collate([{"a": np.zeros(3)}, {"a": np.ones(3)}])
    assert c["a"].shape == (2, 3) and c["a"].dtype == np.int32
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"a": np.zeros(3)}, {"a": np.ones(4)}])


def test_empty_answers_are_rejected_naming_file_and_row(tmp_path):
    """issue 14: "" answers were accepted and moved the "before" forget prob from 0.99 to 0.50."""
    _write(tmp_path / "forget10.json", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "  "}])
    with pytest.raises(TofuDataError, match=r"forget10.json, row 1: field 'answer' is empty; an empty answer scores no "
                                            r"tokens .* fill it in or remove the row"):
        load_tofu_split("forget10", tmp_path)
    _write(tmp_path / "forget10.json", [{"question": "", "answer": "a"}])
    with pytest.raises(TofuDataError, match=r"forget10.json, row 0: field 'question' is empty"):
        load_tofu_split("forget10", tmp_path)
    row = {"question": "q", "answer": "a", "paraphrased_answer": "p", "paraphrased_question": "pq",
           "perturbed_answer": ["x", "y", "", "z", "w"]}
    _write(tmp_path / "forget10_perturbed.json", [row])
    with pytest.raises(TofuDataError, match=r"row 0: field 'perturbed_answer' entry 2 is empty"):
        load_tofu_split("forget10_perturbed", tmp_path)
