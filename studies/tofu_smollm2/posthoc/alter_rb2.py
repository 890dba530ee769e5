"""Post-hoc (not the study's rule): ALTER lr 1e-3 as trained (retain_bias 2) on the reported rows, seeds 1, 2, 0."""
import json
from pathlib import Path
from alter_jax.study.tofu_smollm2 import Setting, Study, StudyConfig

cfg = StudyConfig(out_dir="runs/posthoc/out")
st = Study(cfg, "posthoc", log=lambda m: print(m, flush=True))
for seed in (1, 2, 0):
    rec = st.point(Setting("alter", 1e-3, seed=seed), reported=True)
    print("RESULT", seed, json.dumps({k: rec.get(k) for k in ("forget_quality", "model_utility", "forget_rouge",
          "extraction_strength", "privleak", "forget_degenerate", "forget_gen_ppl", "retain_degenerate")}), flush=True)
