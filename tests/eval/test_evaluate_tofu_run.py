"""`bin/evaluate tofu` on a finished ALTER run (--run: gated forward, GradNorm through it) and on
its base model (--model), on the demo world with a holdout of authors the model never saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.train.test_loop import demo_run

from alter_jax.data.synthetic import generate_authors
from alter_jax.demo import demo_dir, ensure_demo_model
from alter_jax.train.loop import unlearn

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~1 min unlearning + 2 evaluations (2-3 min on a shared 2-core VM)
def test_tofu_on_an_alter_run_and_its_base_model(tmp_path):
    report = unlearn(demo_run(tmp_path / "run", eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2}),
                     progress=False, log=lambda *_: None)
    ensure_demo_model(progress=False, log=lambda *_: None)
    data = tmp_path / "data"
    data.mkdir()
    for f in (demo_dir() / "data").iterdir():
        (data / f.name).write_text(f.read_text())
    unseen = generate_authors(12, seed=7, per_author=20)[-40:]  # the demo model never saw these authors
    (data / "holdout25.json").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                                 for r in unseen))
    res = {}
    for flag, value in (("--model", report["model"]), ("--run", str(tmp_path / "run"))):
        out = tmp_path / flag[2:]
        proc = subprocess.run(
            [sys.executable, str(REPO / "bin" / "evaluate"), "tofu", flag, value, "--data", str(data),
             "--forget-split", "forget25", "--prompt-format", "llama2", "--ds-size", "8", "--batch-size", "8",
             "--max-length", "96", "--max-new-tokens", "8", "--attacks", "loss,min_k,gradnorm", "--no-progress",
             "--out", str(out), "--json", str(out / "m.json")],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[flag] = json.loads((out / "m.json").read_text())
    base, run = res["--model"], res["--run"]
    assert base["holdout"].startswith("holdout25 (8 rows)")
    # measured 2026-12-01: base forget prob 0.993, EM 1.0, ES 1.0, AUC loss / min_k / gradnorm 1.0;
    # ALTER run prob 0.037, EM 0.38, ES 0.09, AUC loss 0.77, min_k 0.80, gradnorm 0.11
    # the base model was trained on the forget authors: its forget rows look like members
    assert base["mia_loss_auc"] > 0.9 and base["forget"]["exact_memorization"] > 0.5
    # unlearning (through the gated forward) lowers the forget answer probability, memorization and the attack AUC
    assert run["forget"]["prob"] < base["forget"]["prob"]
    assert run["forget"]["exact_memorization"] < base["forget"]["exact_memorization"]
    assert run["mia_loss_auc"] < base["mia_loss_auc"]
    for m in (base, run):
        assert 0.0 <= m["mia_gradnorm_auc"] <= 1.0 and m["mia_zlib_auc"] is None
        # issue 19: fluency per split; generated answers scored by the untouched backbone
        assert 0.0 <= m["forget"]["degenerate_rate"] <= 1.0 and m["retain"]["generated_ppl"] >= 1.0
    assert "the run's base model" in run["config"]["fluency_reference"]
    assert "the evaluated model itself" in base["config"]["fluency_reference"]
