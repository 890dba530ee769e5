"""bin/evaluate on a finished unlearning run (--run) and on a model folder (--model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
