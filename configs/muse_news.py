"""ALTER on MUSE-News (forget: news articles; retain: the retain split) with the MUSE target model."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    cfg = paper_config(model="muse-bench/MUSE-news_target", prompt_format="plain", forget="forget", retain="retain1",
                       source="muse-bench/MUSE-News", output_dir="runs/muse_news")
    cfg.model.max_length = 512
    cfg.data.kind = "text"
    return cfg
