"""Why ALTER seed 1 (lr 1e-3, evaluated with retain_bias 0) collapses: retrain it, trace its routing.

``python studies/tofu_smollm2/posthoc/seed_collapse.py 1`` from the repository root, after ``bin/study
tofu-smollm2`` has built ``runs/study_smollm2``; writes ``routing_alter_lr0.001_s<seed>.json`` beside this script.
"""
import shutil
import sys
from pathlib import Path

from alter_jax.eval.routing import parse_settings, run_routing_diagnostic
from alter_jax.study.tofu_smollm2 import Setting, StudyConfig, run_config
from alter_jax.train.loop import unlearn

seed = int(sys.argv[1])
cfg = StudyConfig()
work = Path(cfg.work_dir)
s = Setting("alter", 1e-3, seed=seed)
rd = Path(f"runs/diag/{s.name}")
if not (rd / "report.json").is_file():
    r = unlearn(run_config(cfg, s, work / "models" / "full", work / "data", rd), progress=False)
    print("trained", r["steps"], r["wall_s"], flush=True)
run_routing_diagnostic(rd, num_questions=10, grid=parse_settings("retain_bias=0"), out=rd, sources=("self",))
shutil.copy(rd / "routing.json", Path(__file__).parent / f"routing_alter_lr0.001_s{seed}.json")
print("done", flush=True)
