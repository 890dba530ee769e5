"""ALTER on WMDP (bio + cyber forget corpora, each its own forget expert; bio retain corpus) with HuggingFaceH4/zephyr-7b-beta.

Evaluate with: bin/evaluate mcq --model RUN/model-or-adapter --tasks wmdp-bio,wmdp-cyber,mmlu

The RMU baseline with the WMDP paper's Zephyr settings (layer 7, c = 6.5, alpha = 1200, lr 5e-5):
  bin/unlearn --config configs/wmdp_zephyr.py --config.train.method=rmu --config.loss.rmu_layer=7 \
      --config.loss.rmu_steering=6.5 --config.loss.gamma=1200 --config.optim.lr=5e-5 --config.output_dir=runs/wmdp_zephyr_rmu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    cfg = paper_config(model="HuggingFaceH4/zephyr-7b-beta", prompt_format="zephyr", forget="bio-forget-corpus,cyber-forget-corpus",
                       retain="bio-retain-corpus", source="cais/wmdp-corpora", output_dir="runs/wmdp_zephyr")
    cfg.model.max_length = 512
    cfg.data.kind = "text"
    return cfg
