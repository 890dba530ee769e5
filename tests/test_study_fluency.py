"""Fluency columns and example answers of the study reports (alter_jax/study/fluency.py)."""

from __future__ import annotations

import json

import pytest

from alter_jax.study.fluency import best_settings, examples_markdown, folder_fluency, setting_score


def test_best_setting_is_highest_hmean_of_fq_and_relative_mu():
    assert setting_score(0.5, 1.0) == pytest.approx(2 * 0.5 / 1.5)
    assert setting_score(None, 1.0) == 0.0 and setting_score(0.2, 0.0) == 0.0
    entries = {"full": {"forget_quality": 1e-5, "mu_vs_full": 1.0},  # no method: never a "setting"
               "alter": {"method": "alter", "forget_quality": 0.01, "mu_vs_full": 1.0},
               "alter_b0": {"method": "alter", "forget_quality": 0.2, "mu_vs_full": 0.8},
               "ga": {"method": "ga", "forget_quality": 0.9, "mu_vs_full": None}}
    assert best_settings(entries) == {"alter": "alter_b0", "ga": "ga"}


def test_folder_fluency_and_examples(tmp_path):
    def keyed(v):
        return {str(i): x for i, x in enumerate(v)}

    gens = ["...", "A fine answer.", "", "Another answer."]
    log = {"generated_text": keyed([[f"q{i}", g, f"gt{i}"] for i, g in enumerate(gens)]),
           "degenerate": keyed([1.0, 0.0, 1.0, 0.0]), "rep_4": keyed([0.0, 0.0, 0.0, 0.5]),
           "distinct_1": keyed([1.0] * 4), "distinct_2": keyed([1.0] * 4),
           "generated_ppl": keyed([100.0, 2.0, None, 4.0])}
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(log))
    f = folder_fluency(tmp_path)
    assert f["forget_degenerate"] == 0.5 and f["forget_gen_ppl"] == pytest.approx(106 / 3)
    assert f["forget_rep_4"] == pytest.approx(0.125)
    assert f["retain_degenerate"] is None and f["examples"]["retain"] == []  # no retain log
    assert [e[1] for e in f["examples"]["forget"]] == gens[:3]
    md = "\n".join(examples_markdown({"alter": {"method": "alter", "forget_quality": 0.1, "mu_vs_full": 0.9, **f}}))
    assert "**alter** (`alter`)" in md and "| forget | ... | gt0 |" in md and "| forget | (empty) | gt2 |" in md


def test_copy_idk_answers(tmp_path):
    from alter_jax.study.fluency import copy_idk_answers

    src, dst = tmp_path / "tofu", tmp_path / "data"
    src.mkdir()
    assert not copy_idk_answers(src, dst)  # no subset folder yet: nothing written
    dst.mkdir()
    assert not copy_idk_answers(src, dst)  # the source has no file
    (src / "idontknow.jsonl").write_text("I don't know.\nNo idea.\n")
    assert copy_idk_answers(src, dst) and (dst / "idontknow.jsonl").read_text() == "I don't know.\nNo idea.\n"
    (src / "idontknow.jsonl").write_text("changed\n")
    assert copy_idk_answers(src, dst) and (dst / "idontknow.jsonl").read_text().startswith("I don't")  # kept
