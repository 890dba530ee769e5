"""ALTER on TOFU forget10 with Llama-3-8B-Instruct (fine-tune it on TOFU full first: bin/finetune)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    return paper_config(model="meta-llama/Meta-Llama-3-8B-Instruct", prompt_format="llama3", forget="forget10",
                        retain="retain90", output_dir="runs/tofu_10_llama3")
