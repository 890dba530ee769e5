"""The powered SmolLM2 TOFU study (issue 16): data design, selection rule, Pareto verdict, stage
records and resume, the report's keys and plots (from synthetic stage records), and (slow,
``--runslow``) the ``--quick`` end-to-end run on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alter_jax.study import tofu_smollm2 as S


def test_data_design_authors_and_disjoint_eval_slices(tofu_dir, tmp_path):
    from alter_jax.data.tofu import author_blocks, load_tofu_split

    cfg = S.StudyConfig(tofu_dir=str(tofu_dir))
    counts = S.build_data(cfg, tmp_path / "data")
    assert counts["forget"] == 40 and counts["retain"] == 160 and counts["full"] == 200 and counts["holdout"] == 40
    for k in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        assert counts[k] == 40
    assert (counts["val_retain_perturbed"], counts["val_real_authors_perturbed"]) == (24, 20)
    rd, vd = tmp_path / "data", tmp_path / "data_val"
    q = lambda split, d=rd: [r["question"] for r in load_tofu_split(split, str(d))]  # noqa: E731
    # forget = forget01's two authors, all 20 rows each, with perturbed answers for the truth ratio
    assert q("forget_perturbed") == [r["question"] for r in load_tofu_split("forget01_perturbed", str(tofu_dir))]
    blocks = author_blocks(load_tofu_split("full", str(tofu_dir)))
    assert q("retain") == [r["question"] for a in range(8) for r in blocks[a]]
    # the holdout authors are unseen by every model; reported and validation utility rows are disjoint
    assert not set(q("holdout")) & set(q("full"))
    assert q("holdout") == [r["question"] for a in (8, 9) for r in blocks[a]]
    for split in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        assert not set(q(split)) & set(q(split, vd)), split
    assert set(q("retain_perturbed")) | set(q("retain_perturbed", vd)) <= set(q("retain"))
    assert q("forget_perturbed", vd) == q("forget_perturbed")  # Forget Quality: the same forget rows


def test_authors_without_perturbed_answers_are_a_clear_error(tofu_dir, tmp_path):
    cfg = S.StudyConfig(tofu_dir=str(tofu_dir), retain_authors=(50,))
    with pytest.raises(ValueError, match="no perturbed answers.*retain_authors from 0-19"):
        S.build_data(cfg, tmp_path / "data")


def test_selection_rule_keeps_the_utility_floor_and_falls_back_flagged():
    pts = [{"forget_quality": 0.5, "model_utility": 0.80},   # forgets most but loses utility (0.8 < 0.9)
           {"forget_quality": 0.1, "model_utility": 0.95},
           {"forget_quality": 0.1, "model_utility": 0.99},   # tie on FQ: the higher utility wins
           {"forget_quality": 0.01, "model_utility": 1.00}]
    assert S.selection(pts, 1.0, 0.9) == (2, True)
    low = [{"forget_quality": 0.5, "model_utility": 0.5}, {"forget_quality": 0.01, "model_utility": 0.85}]
    i, kept = S.selection(low, 1.0, 0.9)
    assert (i, kept) == (0, False)  # hmean(0.5, 0.5) = 0.5 > hmean(0.01, 0.85)
    with pytest.raises(ValueError, match="no sweep points"):
        S.selection([], 1.0, 0.9)


def test_pareto_frontier_and_verdict():
    assert S.pareto_frontier([(0.9, 0.1), (1.0, 0.05), (0.95, 0.02), (0.92, 0.3)]) == [(1.0, 0.05), (0.92, 0.3)]
    assert S.frontier_at([(1.0, 0.05), (0.92, 0.3)], 0.95) == 0.05 and S.frontier_at([(0.9, 0.1)], 0.95) == 0.0
    above = {"alter": [(1.0, 0.2), (0.93, 0.5)], "ga": [(0.99, 0.1), (0.92, 0.4), (0.5, 0.9)]}
    v = S.pareto_verdict(above, 0.9)
    assert v["met"] is True and v["per_baseline"]["ga"]["baseline_best_fq"] == 0.4  # the point at MU 0.5 is ignored
    below = {"alter": [(1.0, 0.2)], "ga": [(0.95, 0.4)]}
    v = S.pareto_verdict(below, 0.9)
    assert v["met"] is False and v["per_baseline"]["ga"]["alter_below_at_mu"] == [0.95]
    assert S.pareto_verdict({"ga": [(1.0, 0.1)]}, 0.9)["met"] is None


def test_settings_names_and_run_configs_share_the_budget():
    cfg = S.StudyConfig()
    sweep = S.lr_sweep(cfg, "alter")
    assert [s.lr for s in sweep] == list(cfg.lrs_lora) and [s.lr for s in S.lr_sweep(cfg, "npo")] == list(cfg.lrs_full)
    var = S.alter_variants(sweep[1])
    assert [v.name for v in var] == ["alter_lr0.001_thr0.5", "alter_lr0.001_q2", "alter_lr0.001_N3", "alter_lr0.001_rb0"]
    assert sweep[1].with_seed(2).name == "alter_lr0.001_s2"
    # retain_bias is an inference-time router offset: its variant evaluates the trained run of its lr
    assert var[3].trained == sweep[1] and var[0].trained == var[0] and var[3].with_seed(1).trained.name == "alter_lr0.001_s1"
    runs = [S.run_config(cfg, s, Path("m"), Path("d"), Path("o")) for s in (sweep[0], *var, S.lr_sweep(cfg, "ga")[0])]
    assert {(r.train.epochs, r.train.batch_size) for r in runs} == {(cfg.unlearn_epochs, cfg.unlearn_batch)}
    assert runs[1].entropy.value == 0.5 and runs[2].entropy.q == 2.0 and runs[3].data.num_subdomains == 3
    assert runs[4].adapter.retain_bias == 0.0 and runs[-1].optim.lr == 1e-5
    p = S.plan(cfg)
    assert p["scale"] == {"forget_rows": 40, "retain_rows": 160, "unlearn_steps": 50, "runs": 30 + 2 * 9,
                          "seeds": [0, 1, 2]}
    assert len(p["stages"]) == 2 + 9 and p["total_minutes"] > 0 and "mu_floor" in p["selection_rule"]


# --------------------------------------------------------------------------- report from records
def _fig(fq, mu, deg=0.0, ppl=5.0):
    return {"forget_quality": fq, "model_utility": mu, "mu_parts": {"Retain ROUGE": mu}, "forget_prob": 0.3,
            "forget_rouge": 0.4, "forget_truth_ratio": 0.6, "forget_truth_ratio_prob_mean": 0.5,
            "extraction_strength": 0.2, "exact_memorization": 0.7, "privleak": -10.0, "mia_min_k_auc": 0.4,
            "retain_rouge": 0.8, "forget_degenerate": deg, "forget_gen_ppl": ppl, "retain_degenerate": 0.0,
            "retain_gen_ppl": 4.0, "paraphrase_rouge": 0.3, "eval_wall_s": 1.0,
            "examples": {"forget": [["q0", "..........", "gt0"]], "retain": [["q1", "Jane wrote it.", "gt1"]]}}


def _write_records(cfg, stages: Path, methods_fq: dict[str, list[float]], with_relearn=True, seeds=True):
    stages.mkdir(parents=True, exist_ok=True)
    put = lambda name, obj: (stages / f"{name}.json").write_text(json.dumps(obj))  # noqa: E731
    put("eval_full", _fig(0.01, 0.50))
    put("eval_retain", _fig(1.0, 0.45, ppl=6.0))
    put("eval_untouched", _fig(0.9, 0.30))
    put("val_full", _fig(0.01, 0.50))
    for m, fqs in methods_fq.items():
        pts = S.lr_sweep(cfg, m)
        for s, fq in zip(pts, fqs):
            put(f"val_{s.name}", _fig(fq, 0.47))
            put(f"run_{s.name}", {"wall_s": 30.0})
        best = pts[max(range(len(pts)), key=lambda i: fqs[i])]
        if m == "alter":
            for v in S.alter_variants(best):
                put(f"val_{v.name}", _fig(0.001, 0.40))  # below the floor: never selected
        for seed in cfg.seeds if seeds else ():
            put(f"eval_{best.with_seed(seed).name}", _fig(max(fqs) * (1 + 0.1 * seed), 0.46 + 0.01 * seed, deg=0.5))
        if with_relearn:
            put(f"relearn_{m}", {"curve": [{"steps": k, "forget_prob": 0.1 + 0.05 * k * (m != "alter"),
                                            "forget_rouge": 0.2} for k in cfg.relearn_steps],
                                 "base": {"prob": 0.9, "rouge_l_recall": 0.8}})


def test_report_json_keys_goal_and_plots_from_stage_records(tmp_path):
    cfg = S.StudyConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), methods=("alter", "ga", "npo"))
    _write_records(cfg, tmp_path / "out" / "stages", {"alter": [0.02, 0.2, 0.1], "ga": [0.01, 0.05, 0.08],
                                                      "npo": [0.01, 0.02, 0.03]})
    (tmp_path / "out" / "stages.jsonl").write_text(json.dumps({"stage": "x", "wall_s": 120.0}) + "\n")
    rep = S.collect(cfg, tmp_path / "out")
    rep["command"] = "bin/study tofu-smollm2"
    S.write_report(cfg, tmp_path / "out", rep)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    sc = saved["scale"]
    assert (sc["forget_rows"], sc["retain_rows"], sc["seeds"], sc["unlearn_steps"]) == (40, 160, [0, 1, 2], 50)
    assert sc["eval_rows"]["retain"] == sc["eval_rows"]["real_authors"] == 40
    for name in ("full", "retain", "untouched"):
        assert saved[name]["forget_quality"] is not None
    a = saved["methods"]["alter"]
    assert len(a["sweep"]) == 3 + 4 and a["best"]["name"] == "alter_lr0.001"  # FQ 0.2 at MU 0.94 of full
    b = a["best"]
    assert b["setting"] == {"method": "alter", "lr": 1e-3, "num_subdomains": 2, "retain_bias": 2.0, "threshold": 0.3,
                            "q": 1.0}
    assert b["seeds"] == [0, 1, 2]
    assert b["forget_quality_mean"] == pytest.approx(0.22) and b["forget_quality_std"] == pytest.approx(0.02)
    assert b["model_utility_mean"] == pytest.approx(0.47) and b["model_utility_std"] == pytest.approx(0.01)
    assert b["privleak"] == pytest.approx(-10.0) and b["extraction_strength"] == pytest.approx(0.2)
    assert b["relearn"][0] == {"steps": 0, "forget_prob": 0.1, "forget_rouge": 0.2}
    g = saved["goal"]
    assert g["alter_fq_mu"]["met"] is True and g["pareto"]["met"] is True
    assert g["relearn"] == {"met": True, "best_baseline": "ga", "k": 10, "alter_forget_prob": 0.1,
                            "baseline_forget_prob": pytest.approx(0.6)}
    assert g["met"] is True and saved["missing"] == [] and saved["compute_minutes"] == pytest.approx(2.0)
    # issue 19: ALTER's forget answers degenerate half the time: the fluency goal is not met
    assert g["fluency"]["met"] is False and g["fluency"]["retain_forget_gen_ppl"] == 6.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Command: `bin/study tofu-smollm2`" in md and "Stages run by: commands not recorded" in md
    assert "| alter | `alter_lr0.001` | 3 | 0.220 ± 0.020 |" in md
    assert "`alter_lr0.001_q2`" in md and "**(best)**" in md and "| alter | 0.100 / 0.200 |" in md
    assert "- overall: met" in md and "| forget | .......... | gt0 |" in md
    for png in ("fq_vs_mu.png", "relearn.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000


def test_report_names_unfinished_stages_and_undecided_goals(tmp_path):
    cfg = S.StudyConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), methods=("alter", "ga"))
    stages = tmp_path / "out" / "stages"
    _write_records(cfg, stages, {"ga": [0.01, 0.05, 0.08]}, with_relearn=False)
    (stages / f"val_{S.lr_sweep(cfg, 'alter')[0].name}.json").write_text(json.dumps(_fig(0.1, 0.49)))
    rep = S.collect(cfg, tmp_path / "out")
    assert rep["missing"] == ["alter (sweep 1/7)", "ga (seeds / relearning)"]
    assert rep["methods"]["alter"]["best"] is None and rep["goal"]["met"] is None
    rep["command"] = "x"
    S.write_report(cfg, tmp_path / "out", rep)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Stages not finished: alter (sweep 1/7)" in md and "not decided (stages missing)" in md


def test_pareto_and_relearning_wait_for_every_baseline(tmp_path):
    """A verdict judged on the finished baselines alone is provisional: "met" needs all of them, while
    ALTER below one finished baseline already decides the Pareto goal as not met."""
    cfg = S.StudyConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), methods=("alter", "ga", "npo"))
    stages = tmp_path / "out" / "stages"
    _write_records(cfg, stages, {"alter": [0.02, 0.2, 0.1], "ga": [0.01, 0.05, 0.08]})
    (stages / f"val_{S.lr_sweep(cfg, 'npo')[0].name}.json").write_text(json.dumps(_fig(0.01, 0.47)))
    rep = S.collect(cfg, tmp_path / "out")
    g = rep["goal"]
    assert g["alter_fq_mu"]["met"] is True
    assert g["pareto"]["met"] is None and g["pareto"]["met_so_far"] is True and g["pareto"]["pending"] == ["npo"]
    assert g["relearn"] == {"met": None, "pending": ["npo"]} and g["met"] is None
    rep["command"] = "x"
    S.write_report(cfg, tmp_path / "out", rep)
    md = (tmp_path / "out" / "report.md").read_text()
    assert ("Pareto frontier above every baseline at MU ≥ 90% of full: not decided (stages missing) "
            "(above the finished baselines ga so far); waiting for npo") in md
    assert "under relearning: not decided (stages missing); waiting for npo" in md
    # ga's sweep now beats ALTER's at every utility: not met, whatever npo does
    for s, mu in zip(S.lr_sweep(cfg, "ga"), (0.49, 0.4901, 0.4902)):  # three utilities that print as 0.980
        (stages / f"val_{s.name}.json").write_text(json.dumps(_fig(0.5, mu)))
    rep = S.collect(cfg, tmp_path / "out")
    g = rep["goal"]
    assert g["pareto"]["met"] is False and len(g["pareto"]["per_baseline"]["ga"]["alter_below_at_mu"]) == 4
    rep["command"] = "x"
    S.write_report(cfg, tmp_path / "out", rep)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "NOT met; ALTER below: ga at MU/full 0.940, 0.980\n" in md  # each printed utility once
    assert g["relearn"]["met"] is None and g["met"] is False  # relearning still waits for npo; one part failed


def test_finished_stages_are_skipped_and_max_minutes_stops(tmp_path):
    cfg = S.StudyConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), methods=("ga",))
    _write_records(cfg, tmp_path / "out" / "stages", {"ga": [0.01, 0.05, 0.08]})
    st = S.Study(cfg, "x", log=lambda *_: None)

    def boom():
        raise AssertionError("a finished stage ran again")
    assert st.eval_stage("full", boom, True)["model_utility"] == 0.5
    # every record of ga exists: the method stage only reads them (no model, run or data folder exists)
    assert st.method_stage("ga", 0.5) is True
    # a new stage after the time limit is not started
    for f in (tmp_path / "out" / "stages").glob("eval_ga_*"):
        f.unlink()
    st2 = S.Study(S.StudyConfig(**{**S.dataclasses.asdict(cfg), "max_minutes": 1e-9}), "x", log=lambda *_: None)
    assert st2.method_stage("ga", 0.5) is False
    # a STOP file in the work folder stops the same way (an operator's clean stop between stages)
    assert not st.out_of_time()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "STOP").touch()
    assert st.out_of_time() and st.method_stage("ga", 0.5) is False


def test_second_worker_runs_only_its_methods_on_the_first_workers_models(tmp_path, monkeypatch):
    w1, w2, out = tmp_path / "w1", tmp_path / "w2", tmp_path / "out"
    design = S.StudyConfig(out_dir=str(out), work_dir=str(w1), methods=("ga", "npo"))
    cfg = S.dataclasses.replace(design, work_dir=str(w2), only=("npo",), models_from=str(w1))
    # the session fields stay out of the design record (which only the first worker writes)
    assert S.plan(S.dataclasses.replace(cfg, work_dir=design.work_dir))["config"] == S.plan(design)["config"]
    logs: list[str] = []
    st = S.Study(cfg, "x", log=logs.append)
    assert st.methods() == ("npo",) and S.Study(design, "x").methods() == ("ga", "npo")

    def boom(*_a, **_k):
        raise AssertionError("the second worker fine-tuned a model of its own")
    monkeypatch.setattr(S, "finetune_model", boom)
    # a model the first worker has finished is read from its folder
    (w1 / "models" / "full").mkdir(parents=True)
    (w1 / "models" / "full" / "finetune.json").write_text("{}")
    assert st.model_dir("full") == w1 / "models" / "full"
    # one it has not is waited for; a STOP file in this worker's folder ends the wait, not the process
    w2.mkdir()
    (w2 / "STOP").touch()
    with pytest.raises(S._Stopped, match="retain"):
        st.model_dir("retain")
    assert any("waiting for the fine-tuned retain model" in m for m in logs)
    rep = st.run()  # the data subset is missing too: stopped while waiting, the report still written
    assert any("stopped while waiting" in m and "STOP exists" in m for m in logs)
    assert set(rep["methods"]) == {"ga", "npo"}
    (w2 / "STOP").unlink()
    # every record exists: the second worker goes through npo only, and the report keeps the whole design
    _write_records(design, out / "stages", {"ga": [0.01, 0.05, 0.08], "npo": [0.01, 0.02, 0.03]})
    for f in (w1 / "data" / "counts.json", w1 / "data_val" / "holdout.json"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    logs.clear()
    rep = st.run()
    assert any(m.startswith("npo: best") for m in logs) and not any(m.startswith("ga: best") for m in logs)
    saved = json.loads((out / "report.json").read_text())
    assert saved["methods"]["ga"]["best"]["name"] == "ga_lr0.0001" and saved["methods"]["npo"]["best"] is not None
    assert saved["written_by"] == "x" and saved["command"] == "x"
    assert not (w2 / "data").exists() and not (w2 / "models").exists() and not (out / "plan.json").exists()


def test_stage_log_and_records_are_written(tmp_path):
    cfg = S.StudyConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    st = S.Study(cfg, "x", log=lambda *_: None)
    st.save("val_x", {"a": 1}, 12.5)
    st.save("val_y", {"a": 2}, 7.5)
    assert st.record("val_x") == {"a": 1} and st.record("nope") is None
    assert S._stage_minutes(tmp_path / "out") == pytest.approx(20.0 / 60)
    # each stage names the command that ran it; a stage recorded without one reads as None
    with open(tmp_path / "out" / "stages.jsonl", "a") as fh:
        fh.write(json.dumps({"stage": "old", "wall_s": 1.0}) + "\n")
    S.Study(cfg, "y", log=lambda *_: None).save("val_z", {"a": 3}, 1.0)
    assert S.stage_commands(tmp_path / "out") == ["x", None, "y"]


def test_design_command_drops_the_session_options():
    cmd = ("bin/study tofu-smollm2 --only npo,ga --work-dir runs/b --models-from runs/a --max-minutes 40 "
           "--keep-runs --max-minutes=3")
    assert S.design_command(cmd) == "bin/study tofu-smollm2"
    assert S.design_command("bin/study tofu-smollm2 --quick --methods ga --work-dir w") == \
        "bin/study tofu-smollm2 --quick --methods ga"


def test_cli_options_build_the_config(tofu_dir, capsys):
    import argparse

    p = argparse.ArgumentParser()
    S.add_arguments(p)
    cfg = S.config_from_args(p.parse_args(["--quick", "--tofu-dir", str(tofu_dir), "--methods", "ga,alter",
                                           "--max-minutes", "30"]))
    assert cfg.methods == ("ga", "alter") and cfg.unlearn_epochs == 1 and cfg.rows_per_author == 2
    assert cfg.max_minutes == 30.0
    # the plan records the design, not how one session ran: a rerun with another budget leaves it unchanged
    assert S.plan(cfg)["config"] == S.plan(S.dataclasses.replace(cfg, max_minutes=90.0, keep_runs=True))["config"]
    assert "max_minutes" not in S.plan(cfg)["config"] and S.plan(cfg)["config"]["methods"] == ("ga", "alter")
    with pytest.raises(SystemExit, match="--methods: nope unknown"):
        S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--methods", "nope"]))
    two = S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--only", "npo,ga", "--work-dir", "runs/b",
                                           "--models-from", "runs/a"]))
    assert two.only == ("npo", "ga") and two.models_from == "runs/a" and two.methods == S.METHODS
    with pytest.raises(SystemExit, match="--only: nope not in the study's methods"):
        S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--only", "nope"]))
    with pytest.raises(SystemExit, match="its own --work-dir"):
        S.config_from_args(p.parse_args(["--tofu-dir", str(tofu_dir), "--models-from", "runs/a"]))
    assert S.main(["--plan", "--tofu-dir", str(tofu_dir)]) == 0
    out = capsys.readouterr().out
    assert "alter: 7 sweep points (6 trained) + 2 seeds + relearning" in out and "total (estimate)" in out
    assert "measured so far" in out


def test_training_summary_keeps_each_phases_terms_first_last_min_max(tmp_path):
    f = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "phase": "phase1", "loss": 9.0},
            {"step": 1, "epoch": 0, "phase": "main", "loss": 3.0, "grad_norm": 0.5, "tokens_per_s": 9.0},
            {"step": 2, "epoch": 0, "phase": "main", "loss": 1.0, "grad_norm": 4.0, "tokens_per_s": 20.0},
            {"step": 3, "epoch": 1, "phase": "main", "loss": 2.0, "grad_norm": 1.0}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = S.training_summary(f)
    assert list(out) == ["phase1", "main"]  # ALTER's phase I loss is not mixed into the main phase's
    assert out["phase1"] == {"loss": {"first": 9.0, "last": 9.0, "min": 9.0, "max": 9.0}}
    assert set(out["main"]) == {"loss", "grad_norm"}  # counters, throughput and strings are not training terms
    assert out["main"]["loss"] == {"first": 3.0, "last": 2.0, "min": 1.0, "max": 3.0}
    assert out["main"]["grad_norm"] == {"first": 0.5, "last": 1.0, "min": 0.5, "max": 4.0}
    assert S.training_summary(tmp_path / "missing.jsonl") == {}


def test_model_utility_that_one_zero_part_forces_is_named_not_printed_as_zero():
    """issue 14: at --quick scale a harmonic mean with one zero part read 'MU 0.000' for every model."""
    assert S.mu_text(0.0, {"Retain ROUGE": 0.5, "World Facts ROUGE": 0.0}) == "n/a (World Facts ROUGE = 0)"
    assert S.mu_text(0.0, {"a": 0.0, "b": 0.0}) == "n/a (a = 0 and more)"
    assert S.mu_text(0.4567, {"a": 0.3}) == "0.457"
    assert S.mu_text(None, None) == "—"


@pytest.mark.slow
def test_quick_study_end_to_end(tofu_dir, tmp_path):
    """Every stage once at the tiny scale on the real SmolLM2 (compiles dominate), then a rerun that
    finds every stage done."""
    cfg = S.quick_config(tofu_dir=str(tofu_dir), work_dir=str(tmp_path / "w"), out_dir=str(tmp_path / "o"))
    rep = S.Study(cfg, "bin/study tofu-smollm2 --quick", log=lambda *_: None).run()
    assert rep["missing"] == []
    for e in (rep["untouched"], rep["full"], rep["retain"]):
        assert 0.0 <= e["forget_rouge"] <= 1.0 and e["forget_quality"] is not None
    for m in cfg.methods:
        b = rep["methods"][m]["best"]
        assert b["seeds"] == list(cfg.seeds) and len(b["relearn"]) == len(cfg.relearn_steps)
        assert b["forget_degenerate_mean"] is not None and b["privleak"] is not None
    assert len(rep["methods"]["alter"]["sweep"]) == len(cfg.lrs_lora) + len(S.ALTER_OPEN)
    n = len((tmp_path / "o" / "stages.jsonl").read_text().splitlines())
    S.Study(cfg, "x", log=lambda *_: None).run()
    assert len((tmp_path / "o" / "stages.jsonl").read_text().splitlines()) == n  # nothing ran again

