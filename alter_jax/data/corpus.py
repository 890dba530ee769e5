"""Plain-text corpora for unlearning (WMDP forget corpora, WikiText, MUSE raw text).

Rows are ``{"text": ...}``. A local folder holds ``<split>.json`` / ``.jsonl`` (JSON lines
or a JSON array); anything else is a hub id read with ``datasets.load_dataset(source,
split_name, split="train")``. Encoding treats the whole text as the answer (every real
token is scored), truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class CorpusError(ValueError):
    """A corpus file or row that cannot be used; the message names file, row and fix."""


def load_text_split(name: str, source: str | os.PathLike, *, field: str = "text", min_chars: int = 1) -> list[dict]:
    src = Path(os.path.expanduser(str(source)))
    if src.is_dir():
        for ext in (".json", ".jsonl"):
            f = src / f"{name}{ext}"
            if f.is_file():
                break
        else:
            have = sorted(p.stem for p in src.glob("*.json*"))
            raise CorpusError(f"{src}: no split {name!r} ({name}.json or .jsonl); available: {', '.join(have) or 'none'}")
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            raise CorpusError(f"{f}: empty file")
        rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
        origin = str(f)
    else:
        from alter_jax.data.hub import HubDatasetError, load_hub_dataset

        try:
            rows = list(load_hub_dataset(str(source), name, "train"))
        except HubDatasetError as e:
            raise CorpusError(f"cannot load {name!r} from {source!r} ({e}); "
                              "pass a local folder with <split>.jsonl files of {\"text\": ...} rows") from None
        origin = f"{source}:{name}"
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get(field), str):
            raise CorpusError(f"{origin}: row {i} has no string field {field!r}")
        if len(r[field]) >= min_chars:
            out.append({"text": r[field], **{k: v for k, v in r.items() if k == "domain"}})
    if not out:
        raise CorpusError(f"{origin}: no rows with text")
    return out


def encode_texts(tokenizer, rows, max_length: int) -> dict[str, np.ndarray]:
    """Right-padded ``int32[N, max_length]`` arrays; labels = every real token."""
    n = len(rows)
    ids = np.full((n, max_length), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    for i, r in enumerate(rows):
        toks = tokenizer(r["text"], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
