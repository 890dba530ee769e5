"""Post-hoc (not the study's rule): ALTER lr 1e-3 as trained (retain_bias 2) on the reported rows, seeds 1, 2, 0.

Run from the repository root after ``bin/study tofu-smollm2`` has built ``runs/study_smollm2`` (data, full
model): ``python studies/tofu_smollm2/posthoc/alter_rb2.py``. Its run folders go to the study's work folder
(``runs/study_smollm2/runs``), its stage records to ``runs/posthoc/out/stages``; the eval records are then
copied beside this script, where ``notes.md`` reads them.
"""
import json
import shutil
from pathlib import Path

from alter_jax.study.tofu_smollm2 import Setting, Study, StudyConfig

here = Path(__file__).parent
cfg = StudyConfig(out_dir="runs/posthoc/out")
st = Study(cfg, "posthoc", log=lambda m: print(m, flush=True))
if not (st.retain_logs() / "eval_log_forget.json").is_file():  # FQ / PrivLeak against the study's retain model
    shutil.copytree(here.parent / "retain_logs", st.retain_logs(), dirs_exist_ok=True)
for seed in (1, 2, 0):
    s = Setting("alter", 1e-3, seed=seed)
    rec = st.point(s, reported=True)
    shutil.copy(st.stages / f"eval_{s.name}.json", here / f"eval_{s.name}.json")
    print("RESULT", seed, json.dumps({k: rec.get(k) for k in ("forget_quality", "model_utility", "forget_rouge",
          "extraction_strength", "privleak", "forget_degenerate", "forget_gen_ppl", "retain_degenerate")}), flush=True)
