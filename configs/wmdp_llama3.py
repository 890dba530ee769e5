"""ALTER on WMDP (bio + cyber forget corpora, each its own forget expert; bio retain corpus) with meta-llama/Meta-Llama-3-8B-Instruct.

Evaluate with: bin/evaluate mcq --model RUN/model-or-adapter --tasks wmdp-bio,wmdp-cyber,mmlu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    cfg = paper_config(model="meta-llama/Meta-Llama-3-8B-Instruct", prompt_format="llama3", forget="bio-forget-corpus,cyber-forget-corpus",
                       retain="bio-retain-corpus", source="cais/wmdp-corpora", output_dir="runs/wmdp_llama3")
    cfg.model.max_length = 512
    cfg.data.kind = "text"
    return cfg
