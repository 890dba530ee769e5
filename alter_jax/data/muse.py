"""MUSE benchmark data (Shi et al. 2024): hub ``muse-bench/MUSE-News`` / ``MUSE-Books`` or a local folder.

Layout (configs -> splits -> fields), as on the hub dataset cards:

=========  ==============================================  =====================
config     splits                                          fields
=========  ==============================================  =====================
raw        forget, retain1, retain2, holdout               text
verbmem    forget                                          prompt, gt
knowmem    forget_qa, retain_qa, forget_qa_icl,            question, answer
           retain_qa_icl  (MUSE-News only)
privleak   forget, retain, holdout                         text
scal/sust  forget_1 .. forget_4                            text
train      forget, retain1, retain2                        text
=========  ==============================================  =====================

A local folder has the same shape: ``<root>/<config>/<split>.json`` (a list of rows, or
of strings for text configs), ``.jsonl``, ``.parquet``, or the hub's parquet shards
``<root>/<config>/<split>-*.parquet``. Every source goes through one validation path
(:func:`rows_to_records`) whose errors name the file, row and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

MUSE_HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}

MUSE_FIELDS: dict[str, tuple[str, ...]] = {
    "raw": ("text",),
    "verbmem": ("prompt", "gt"),
    "knowmem": ("question", "answer"),
    "privleak": ("text",),
    "scal": ("text",),
    "sust": ("text",),
    "train": ("text",),
}


class MuseDataError(ValueError):
    """A MUSE source is missing, unreadable or has a malformed row."""


@dataclass(frozen=True)
class VerbMemItem:
    """A verbatim-memorisation probe: the model continues ``prompt``; ``gt`` is the true continuation."""

    prompt: str
    gt: str


@dataclass(frozen=True)
class QAItem:
    """A knowledge-memorisation question and its gold answer."""

    question: str
    answer: str


def rows_to_records(rows: Sequence[Any], config: str, origin: str) -> list[dict[str, str]]:
    """Validate rows of ``config`` (dicts, or bare strings for text-only configs)."""
    if config not in MUSE_FIELDS:
        raise MuseDataError(f"unknown MUSE config {config!r}; valid: {', '.join(MUSE_FIELDS)}")
    fields = MUSE_FIELDS[config]
    out = []
    for i, row in enumerate(rows):
        where = f"{origin} row {i}"
        if isinstance(row, str) and fields == ("text",):
            row = {"text": row}
        if not isinstance(row, Mapping):
            raise MuseDataError(f"{where}: expected an object with field(s) {list(fields)}, got {type(row).__name__}")
        rec = {}
        for f in fields:
            if f not in row:
                raise MuseDataError(f"{where}: missing field {f!r} (config {config!r} needs {list(fields)}); present: {sorted(row)}")
            v = row[f]
            if not isinstance(v, str):
                raise MuseDataError(f"{where}: field {f!r} must be a string, got {type(v).__name__} {v!r:.60}")
            rec[f] = v
        out.append(rec)
    if not out:
        raise MuseDataError(f"{origin}: no rows found")
    return out


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping) and "data" in data:
                data = data["data"]
            if not isinstance(data, list):
                raise MuseDataError(f"{path}: a .json file must hold a list of rows (or {{'data': [...]}})")
            return data
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MuseDataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            return rows
    except json.JSONDecodeError as e:
        raise MuseDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    raise MuseDataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")


def _local_files(root: Path, config: str, split: str) -> list[Path]:
    folder = root / config
    for suffix in (".json", ".jsonl", ".parquet"):
        if (folder / f"{split}{suffix}").is_file():
            return [folder / f"{split}{suffix}"]
    shards = sorted(folder.glob(f"{split}-*.parquet"))
    if shards:
        return shards
    raise MuseDataError(
        f"{root}: no file for config {config!r} split {split!r}; expected {folder}/{split}.json "
        f"(or .jsonl, .parquet, {split}-*.parquet)"
    )


def load_muse_split(source: str | Path, config: str, split: str) -> list[dict[str, str]]:
    """Rows of one MUSE (config, split) as dicts of the config's fields.

    source: ``news`` / ``books`` (the hub datasets), a hub id, or a local folder.
    """
    if config not in MUSE_FIELDS:
        raise MuseDataError(f"unknown MUSE config {config!r}; valid: {', '.join(MUSE_FIELDS)}")
    s = str(source)
    if Path(s).is_dir():
        rows: list[Any] = []
        files = _local_files(Path(s), config, split)
        for f in files:
            rows.extend(_read_file(f))
        return rows_to_records(rows, config, str(files[0]) if len(files) == 1 else f"{Path(s) / config}/{split}-*.parquet")
    hub_id = MUSE_HUB.get(s.lower(), s)
    if "/" not in hub_id:
        raise MuseDataError(f"MUSE source {s!r} is neither a folder nor one of {list(MUSE_HUB)} nor a hub id 'owner/name'")
    from alter_jax.data.hub import HubDatasetError, load_hub_dataset

    try:
        ds = load_hub_dataset(hub_id, config, split)
    except HubDatasetError as e:
        raise MuseDataError(
            f"could not load {hub_id!r} config {config!r} split {split!r} ({e}). "
            f"Offline? Save it as <folder>/{config}/{split}.json and pass the folder."
        ) from e
    return rows_to_records(list(ds), config, f"{hub_id}/{config}[{split}]")


def load_verbmem(source: str | Path, split: str = "forget") -> list[VerbMemItem]:
    return [VerbMemItem(r["prompt"], r["gt"]) for r in load_muse_split(source, "verbmem", split)]


def load_knowmem(source: str | Path, split: str = "forget_qa") -> list[QAItem]:
    """QA pairs; the in-context examples MUSE prepends live in split ``<split>_icl``."""
    return [QAItem(r["question"], r["answer"]) for r in load_muse_split(source, "knowmem", split)]


def load_texts(source: str | Path, config: str = "privleak", split: str = "forget") -> list[str]:
    """Plain texts of a text-only config (privleak, raw, scal, sust, train)."""
    if MUSE_FIELDS.get(config) != ("text",):
        raise MuseDataError(f"config {config!r} has fields {MUSE_FIELDS.get(config)}, not plain text")
    return [r["text"] for r in load_muse_split(source, config, split)]


def make_verbmem_items(
    texts: Sequence[str], tokenizer, prefix_tokens: int = 32, continuation_tokens: int = 128
) -> list[VerbMemItem]:
    """Build verbatim probes from raw texts: the first ``prefix_tokens`` tokens are the prompt,
    the next ``continuation_tokens`` the ground truth (e.g. the ALTER paper's Harry Potter
    setting uses 200-token prefixes). Texts too short for a 1-token continuation are skipped.
    Tokenised without special tokens, decoded with ``skip_special_tokens=True``."""
    items = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= prefix_tokens:
            continue
        prompt = tokenizer.decode(ids[:prefix_tokens], skip_special_tokens=True)
        gt = tokenizer.decode(ids[prefix_tokens:prefix_tokens + continuation_tokens], skip_special_tokens=True)
        items.append(VerbMemItem(prompt, gt))
    if not items:
        raise MuseDataError(f"make_verbmem_items: no text is longer than prefix_tokens={prefix_tokens} tokens")
    return items
