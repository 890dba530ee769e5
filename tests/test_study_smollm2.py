"""The SmolLM2 TOFU study: data subset, report assembly (from synthetic logs), speed ratios, and
(slow, ``--runslow``) the ``--quick`` end-to-end run on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alter_jax.study import tofu_smollm2 as S


def test_build_data_writes_a_tofu_layout_subset(tofu_dir, tmp_path):
    cfg = S.StudyConfig(tofu_dir=str(tofu_dir), forget_per_author=3, retain_rows=5, eval_rows=2)
    counts = S.build_data(cfg, tmp_path)
    assert counts["forget"] == 6 and counts["retain"] == 5 and counts["full"] == 11
    assert counts["retain_perturbed"] == counts["real_authors_perturbed"] == counts["world_facts_perturbed"] == 2
    from alter_jax.data.tofu import load_tofu_split

    forget = load_tofu_split("forget_perturbed", str(tmp_path))
    # 3 rows of each of forget01's two authors (rows 0-19 and 20-39)
    src = load_tofu_split("forget01_perturbed", str(tofu_dir))
    assert [r["question"] for r in forget] == [r["question"] for r in src[:3] + src[20:23]]
    assert set(load_tofu_split("forget", str(tmp_path))[0]) == {"question", "answer"}


def _fake_logs(folder: Path, rng, shift: float, fluency: bool = False) -> None:
    """The four legacy logs with the keys :func:`alter_jax.eval.tofu.aggregate` reads."""
    def keyed(v):
        return {str(i): x for i, x in enumerate(v)}

    folder.mkdir(parents=True)
    for name, n, k in (("eval_log_forget", 6, 5), ("eval_log", 4, 5), ("eval_real_author_wo_options", 4, 3),
                       ("eval_real_world_wo_options", 4, 3)):
        log = {"avg_gt_loss": keyed((rng.uniform(0.5, 1.5, n) + shift).tolist()),
               "rougeL_recall": keyed(rng.uniform(0.2, 0.9, n).tolist()),
               "avg_paraphrased_loss": keyed((rng.uniform(0.5, 1.5, n) + shift).tolist()),
               "average_perturb_loss": keyed(rng.uniform(1.5, 2.5, (n, k)).tolist())}
        if fluency and name in ("eval_log_forget", "eval_log"):  # what evaluate_split writes with generation
            gens = (["..........", "I do not know that."] * n)[:n]
            log["generated_text"] = keyed([[f"q{i}", g, f"gt{i}"] for i, g in enumerate(gens)])
            log["degenerate"] = keyed([1.0 if g.startswith(".") else 0.0 for g in gens])
            log["rep_4"] = keyed([0.0] * n)
            log["distinct_1"] = log["distinct_2"] = keyed([1.0] * n)
            log["generated_ppl"] = keyed([None if g.startswith(".") else 4.0 for g in gens])
        (folder / f"{name}.json").write_text(json.dumps(log))
    (folder / "summary.json").write_text(json.dumps({"eval_wall_s": 1.0}))
    (folder / "paraphrase.json").write_text(json.dumps({"rougeL_recall": [0.5, 0.25], "generated": ["a", "b"]}))


def test_report_from_finished_stages(tmp_path):
    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    cfg = S.StudyConfig(work_dir=str(work), out_dir=str(tmp_path / "out"), methods=("alter", "ga"),
                        variants=(("alter_lr3e-3", "alter", (("lr_lora", 3e-3),)),))
    (work / "data").mkdir(parents=True)
    (work / "data" / "counts.json").write_text(json.dumps({"forget": 6, "retain": 4}))
    for name, shift in (("untouched", 1.0), ("full", 0.0), ("retain", 1.0), ("alter", 1.0), ("alter_lr3e-3", 1.0)):
        _fake_logs(work / "eval" / name, rng, shift, fluency=name != "alter_lr3e-3")
    for name in ("full", "retain"):
        (work / "models" / name).mkdir(parents=True)
        (work / "models" / name / "finetune.json").write_text(json.dumps({"wall_s": 12.0}))
    for name in ("alter", "alter_lr3e-3"):
        (work / "runs" / name).mkdir(parents=True)
        (work / "runs" / name / "report.json").write_text(json.dumps({"wall_s": 34.0}))
    speed = S.speed_summary({"tokens_per_s": 100.0, "epoch_s": 10.0, "first_step_s": 5.0},
                            {"tokens_per_s": 80.0, "epoch_s": 12.5, "first_step_s": 9.0},
                            {"tokens_per_s": 50.0, "epoch_s": 20.0, "first_step_s": 1.0})
    assert speed["ours_over_torch_time"] == pytest.approx(0.5) and speed["alter_over_lora_time"] == pytest.approx(1.25)
    (work / "speed.json").write_text(json.dumps(speed))

    rep = S.write_report(cfg, work, "bin/study tofu-smollm2")
    assert rep["missing"] == ["ga"]  # the unfinished method is named, the rest reported
    assert rep["retain"]["forget_quality"] == pytest.approx(1.0)  # the retain model against itself
    a = rep["methods"]["alter"]
    for key in ("forget_quality", "model_utility", "forget_rouge", "paraphrase_rouge", "wall_s"):
        assert a[key] is not None, key
    assert a["paraphrase_rouge"] == pytest.approx(0.375) and a["wall_s"] == 34.0
    assert a["mu_over_full"] == pytest.approx(a["model_utility"] / rep["full"]["model_utility"])
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["methods"]["alter"]["wall_s"] == 34.0
    md = (out / "report.md").read_text()
    assert "| alter |" in md and "Stages not finished: ga" in md and "0.50 (goal ≤ 0.7)" in md
    # the variant is reported beside (not among) the methods, with its override
    v = rep["variants"]["alter_lr3e-3"]
    assert v["method"] == "alter" and v["overrides"] == {"lr_lora": 3e-3} and "alter_lr3e-3" not in rep["methods"]
    assert "| alter_lr3e-3 |" in md and "`alter_lr3e-3`: alter with {'lr_lora': 0.003}" in md
    assert (out / "fq_vs_mu.png").stat().st_size > 1000
    # issue 19: fluency next to FQ (3 of 6 forget answers degenerate; ppl over the non-empty ones), "—" where
    # the logs predate it, and example answers of each method's best setting
    assert a["forget_degenerate"] == pytest.approx(0.5) and a["forget_gen_ppl"] == pytest.approx(4.0)
    assert a["retain_degenerate"] == pytest.approx(0.5) and v["forget_degenerate"] is None
    assert "forget degenerate | forget gen. ppl" in md
    row = next(l for l in md.splitlines() if l.startswith("| alter |"))
    assert "| 0.500 | 4.000 | 0.500 | 4.000 |" in row
    assert "## Example answers" in md and "| forget | .......... | gt0 |" in md and "| retain | I do not know that. | gt1 |" in md


def test_variants_override_one_setting_and_bad_ones_are_named():
    cfg = S.StudyConfig(methods=("alter",), variants=(("a2", "alter", (("alter_threshold", 0.6),)),))
    specs = S.run_specs(cfg)
    assert list(specs) == ["alter", "a2"]
    method, vcfg, ov = specs["a2"]
    assert method == "alter" and vcfg.alter_threshold == 0.6 and vcfg.lr_lora == cfg.lr_lora and ov == {"alter_threshold": 0.6}
    run = S.run_config(vcfg, "alter", Path("m"), Path("d"), Path("o"))
    assert run.entropy.value == 0.6 and run.train.epochs == cfg.unlearn_epochs  # same budget
    with pytest.raises(ValueError, match="unknown fields \\['lr_bogus'\\]"):
        S.run_specs(S.StudyConfig(variants=(("x", "alter", (("lr_bogus", 1.0),)),)))
    with pytest.raises(ValueError, match="choose from"):
        S.run_specs(S.StudyConfig(variants=(("x", "nope", ()),)))


def test_cli_options_build_the_config(tofu_dir):
    import argparse

    p = argparse.ArgumentParser()
    S.add_arguments(p)
    cfg = S.config_from_args(p.parse_args(["--quick", "--tofu-dir", str(tofu_dir), "--methods", "ga,alter"]))
    assert cfg.methods == ("ga", "alter") and cfg.unlearn_epochs == 1 and cfg.forget_per_author == 2
    assert cfg.variants == ()  # --quick runs no variants
    full = S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--no-variants"]))
    assert full.variants == () and full.unlearn_epochs == S.StudyConfig().unlearn_epochs
    with pytest.raises(SystemExit, match="unknown nope"):
        S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--methods", "nope"]))


@pytest.mark.slow
def test_quick_study_end_to_end(tofu_dir, tmp_path):
    """~3.5 min on 2 CPU cores (compiles dominate): every stage once at the tiny scale."""
    cfg = S.quick_config(tofu_dir=str(tofu_dir), work_dir=str(tmp_path / "w"), out_dir=str(tmp_path / "o"),
                         methods=("lora_gd",))
    rep = S.run_study(cfg, log=lambda *_: None)
    assert rep["missing"] == []
    for e in (rep["untouched"], rep["full"], rep["retain"], rep["methods"]["lora_gd"]):
        assert 0.0 <= e["forget_rouge"] <= 1.0 and e["forget_quality"] is not None
    sp = rep["speed"]
    assert sp["torch_lora_gd"]["real_tokens_epoch"] == sp["ours_lora_gd"]["real_tokens_epoch"] > 0
    # a rerun finds every stage done and only rewrites the report
    t = (tmp_path / "w" / "eval" / "full" / "summary.json").stat().st_mtime
    S.run_study(cfg, log=lambda *_: None)
    assert (tmp_path / "w" / "eval" / "full" / "summary.json").stat().st_mtime == t


def test_model_utility_that_one_zero_part_forces_is_named_not_printed_as_zero():
    """issue 14: at --quick scale a harmonic mean with one zero part read 'MU 0.000' for every model."""
    from alter_jax.study.tofu_smollm2 import mu_text

    assert mu_text(0.0, {"Retain ROUGE": 0.5, "World Facts ROUGE": 0.0}) == "n/a (World Facts ROUGE = 0)"
    assert mu_text(0.0, {"a": 0.0, "b": 0.0}) == "n/a (a = 0 and more)"
    assert mu_text(0.4567, {"a": 0.3}) == "0.457"
    assert mu_text(None, None) == "—"
