"""ALTER on TOFU forget10 with the TOFU fine-tuned Llama-2-7b-chat (paper settings)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    return paper_config(model="locuslab/tofu_ft_llama2-7b", prompt_format="llama2", forget="forget10",
                        retain="retain90", output_dir="runs/tofu_10")
