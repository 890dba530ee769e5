"""bin/study tofu-small in --quick mode: every stage runs, the report is well formed, a rerun
skips every finished stage; the CLI dispatcher names the studies and refuses unknown ones."""

from __future__ import annotations

import json
import math

import pytest

from alter_jax.cli.study import main as study_main
from alter_jax.study import tofu_small as S

METHODS = ("alter", "asymlora", "lora_gd", "ga")  # gated, plain LoRA and full-parameter paths (time)


def test_select_authors_have_perturbed_data(tofu_dir):
    from alter_jax.data.tofu import load_tofu_split

    chosen = S.select_authors(tofu_dir, 40)
    assert chosen[-20:] == list(range(180, 200))  # forget10 authors last: the forgotten ones are real TOFU forget authors
    assert len(chosen) == 40 and chosen == sorted(chosen)
    with pytest.raises(ValueError, match="--authors"):
        S.select_authors(tofu_dir, 10_000)
    perturbed = {r["question"] for n in ("retain_perturbed", "forget10_perturbed") for r in load_tofu_split(n, tofu_dir)}
    full = load_tofu_split("full", tofu_dir)
    assert all(full[a * 20 + i]["question"] in perturbed for a in chosen for i in range(20))


def test_quick_study_report_and_resume(tofu_dir, tmp_path):
    cfg = S.quick_config(tofu_dir=str(tofu_dir), work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "out"),
                         methods=METHODS, variants=(("alter_bias0", "alter", (("retain_bias", 0.0),)),))
    first = S.run_study(cfg, command="test", log=lambda *_: None)
    assert first["ran"][:4] == ["data", "tokenizer", "models/full", "models/retain"]
    assert {f"runs/{m}" for m in METHODS} <= set(first["ran"])

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["methods"]
    assert set(rows) == {"full", "retain", *METHODS, "alter_bias0"}
    assert rows["alter_bias0"]["method"] == "alter" and rows["alter_bias0"]["overrides"] == {"retain_bias": 0.0}
    assert rows["alter_bias0"]["alter_settings"]["retain_bias"] == 0.0 and rows["alter"]["alter_settings"]["retain_bias"] == 2.0
    for name, r in rows.items():
        for key in ("forget_quality", "model_utility", "utility_parts", "forget_rouge", "paraphrase_rouge",
                    "forget_prob", "wall_s"):
            assert key in r, (name, key)
        assert 0.0 <= r["forget_quality"] <= 1.0 and math.isfinite(r["model_utility"])
        assert set(r["utility_parts"]) == {"Retain Prob.", "Retain ROUGE", "Retain Truth Ratio"}
        assert 0.0 <= r["forget_rouge"] <= 1.0 and 0.0 <= r["paraphrase_rouge"] <= 1.0 and r["wall_s"] > 0
    assert rows["retain"]["forget_quality"] == pytest.approx(1.0)  # KS of a sample against itself
    assert rows["ga"]["learning_rates"] != rows["lora_gd"]["learning_rates"]
    assert report["data"]["rows"]["forget"] == 20 and report["data"]["rows"]["retain"] == 40
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Command: `test`" in md and "| alter |" in md and "Real Authors" in md
    assert (tmp_path / "out" / "fq_vs_mu.png").stat().st_size > 1000
    # issue 19: fluency of the greedy answers next to FQ (under the full model), examples of each best setting
    assert "| forget degenerate | forget gen. ppl | retain degenerate | retain gen. ppl |" in md
    for name, r in rows.items():
        assert 0.0 <= r["forget_degenerate"] <= 1.0 and 0.0 <= r["retain_degenerate"] <= 1.0, name
        assert r["forget_gen_ppl"] is None or r["forget_gen_ppl"] >= 1.0, name
        assert len(r["examples"]["forget"]) == 3 and len(r["examples"]["retain"]) == 3, name
    assert "## Example answers" in md and "**alter** (`alter" in md and "**ga** (`ga`)" in md
    # issue 14: --quick printed "Model Utility 0.000" for every model; its 1-epoch full model has not learned
    # the data (retain prob ~0.003), so MU / FQ are reported as not measurable instead
    assert rows["full"]["utility_parts"]["Retain Prob."] < S.LEARNED_PROB and report["full_learned"] is False
    assert "**Not measurable: the full model has not learned its training data (retain prob" in md
    assert "| alter | n/a | n/a |" in md and "Not checked:" in md
    assert all(r["mu_vs_full"] is None for r in rows.values())

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("summary.json")}
    second = S.run_study(cfg, command="test", log=lambda *_: None)
    assert second["ran"] == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert second["report"]["methods"]["alter"]["forget_quality"] == rows["alter"]["forget_quality"]

    changed = S.quick_config(tofu_dir=str(tofu_dir), work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "out"),
                             methods=METHODS, variants=(), lr_full=0.5)
    with pytest.raises(ValueError, match="other settings"):
        S.run_study(changed, command="test", log=lambda *_: None)


def test_cli_dispatch(capsys):
    assert study_main(["nope"]) == 2
    assert "tofu-small" in capsys.readouterr().err
    assert study_main(["--help"]) == 0
    assert "tofu-small" in capsys.readouterr().out
    assert study_main(["tofu-small", "--quick", "--authors", "2", "--forget-authors", "2"]) == 2
    assert "--forget-authors" in capsys.readouterr().err
