"""bin/evaluate on a finished unlearning run (--run) and on a model folder (--model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.train.test_loop import demo_run

from alter_jax.train.loop import unlearn

REPO = Path(__file__).resolve().parents[2]


def test_mcq_on_a_run_and_on_its_base_model(tmp_path):
    run = demo_run(tmp_path / "run", train={"max_steps": 2, "epochs": 1},
                   eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2})
    report = unlearn(run, progress=False, log=lambda *_: None)
    qs = [{"question": f"Which city is listed as number {i}?", "choices": ["Paris", "Lima", "Oslo", "Rome"],
           "answer": i % 4, "subject": "geo" if i % 2 else "misc"} for i in range(6)]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = {}
    for flag, value in (("--run", str(tmp_path / "run")), ("--model", report["model"])):
        res = tmp_path / f"{flag[2:]}.json"
        proc = subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), "mcq", flag, value, "--tasks", str(f),
                               "--no-progress", "--json", str(res)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[flag] = json.loads(res.read_text())[str(f)]
        assert 0.0 <= out[flag]["accuracy"] <= 1.0 and set(out[flag]["per_subject"]) == {"geo", "misc"}


def test_missing_run_folder_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), "mcq", "--run", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_tofu_on_a_run_uses_the_runs_format_data_and_split(tmp_path, capsys):
    """issue 14: ``evaluate tofu --run R`` scored the demo with the plain format and TOFU's hub data
    (retain prob 0.349 where the run measured 0.99). Now the run's settings apply unless overridden."""
    from alter_jax.cli import evaluate as evaluate_cli
    from alter_jax.demo import ensure_demo_model

    run_dir = tmp_path / "run"
    unlearn(demo_run(run_dir, train={"max_steps": 1, "epochs": 1},
                     eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2}), progress=False, log=lambda *_: None)
    common = ["--ds-size", "4", "--batch-size", "4", "--max-new-tokens", "2", "--max-length", "96",
              "--generation-max-length", "96", "--no-progress"]
    assert evaluate_cli.main(["tofu", "--run", str(run_dir), "--out", str(tmp_path / "ev"), *common]) == 0
    err = capsys.readouterr().err
    data = str(ensure_demo_model(progress=False).parent / "data")
    assert f"data {data} (run), forget_split forget25 (run), prompt_format llama2 (run)" in err, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["config"]["prompt_format"] == "llama2" and summary["config"]["source"] == data
    assert summary["config"]["forget_split"] == "forget25"
    retain = json.loads((tmp_path / "ev" / "eval_log.json").read_text())
    prob = np.mean([np.exp(-v) for v in retain["avg_gt_loss"].values()])
    assert prob > 0.9, prob  # the demo model knows its retain authors in the run's format (0.35 in "plain")
    # an explicit flag wins over the run's setting
    assert evaluate_cli.main(["tofu", "--run", str(run_dir), "--out", str(tmp_path / "ev2"), "--prompt-format", "plain",
                              *common]) == 0
    assert "prompt_format plain (--prompt-format)" in capsys.readouterr().err
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["config"]["prompt_format"] == "plain"


def test_mcq_hub_task_offline_fails_at_once_listing_the_tasks(tmp_path):
    """issue 14: ``mcq --tasks wmdp-chem`` spent 28 s on hub retries and never listed the valid task names."""
    import os
    import time

    env = {**os.environ, "HF_ENDPOINT": "https://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # nothing listens
    env.pop("HF_HUB_OFFLINE", None)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), "mcq", "--model", str(tmp_path / "unused"),
                           "--tasks", "wmdp-chem", "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    took = time.perf_counter() - t
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "'cais/wmdp' config 'wmdp-chem'" in proc.stderr and "hub is not reachable" in proc.stderr, proc.stderr
    assert "Valid tasks: wmdp-bio, wmdp-cyber, wmdp-chem, mmlu, mmlu:<subject>" in proc.stderr
    assert took < 30, took  # no retry back-off (start-up included)
