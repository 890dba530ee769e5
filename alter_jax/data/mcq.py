"""Multiple-choice question sets: WMDP (bio, cyber) and MMLU.

Every source ends up as a list of :class:`MCQItem` through one validation path
(:func:`items_from_rows`), whether it came from the Hugging Face hub or a local file:

- hub: ``cais/wmdp`` (configs ``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``; split ``test``)
  and ``cais/mmlu`` (config = a subject such as ``abstract_algebra``, or ``all``;
  split ``test``), loaded with :func:`datasets.load_dataset`;
- local: a ``.json`` (a list of rows, or ``{"data": [...]}``), ``.jsonl`` or ``.parquet``
  file whose rows carry ``question`` (str), ``choices`` (list of 4 str), ``answer``
  (int index 0..3, or one of the letters "A".."D") and optionally ``subject`` (str).

The ``subject`` of an item is the key accuracies are grouped by, and it also picks the
lm-evaluation-harness description line (see ``alter_jax.eval.mcq`` and
docs/eval_definitions.md). WMDP rows have no subject column: they get the config name
(``wmdp-bio`` ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

NUM_CHOICES = 4
LETTERS = ("A", "B", "C", "D")

WMDP_HUB_ID = "cais/wmdp"
MMLU_HUB_ID = "cais/mmlu"
WMDP_CONFIGS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")

# Topic words used by lm-evaluation-harness in its per-task description line
# (lm_eval/tasks/wmdp/wmdp_{bio,cyber,chem}.yaml). MMLU subjects use the subject name
# with "_" replaced by " " (lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml).
WMDP_TOPICS = {"wmdp-bio": "biology", "wmdp-cyber": "cybersecurity", "wmdp-chem": "chemistry"}

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


class MCQDataError(ValueError):
    """A multiple-choice source is missing, unreadable or has a malformed row."""


@dataclass(frozen=True)
class MCQItem:
    """One 4-way multiple-choice question.

    question: the stem; choices: exactly 4 option texts; answer: index of the correct
    option (0..3); subject: grouping key for per-subject accuracy ("" when unknown).
    """

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    subject: str = ""


def subject_topic(subject: str) -> str:
    """The words the harness puts after "... about " for ``subject`` ("" if none)."""
    if subject in WMDP_TOPICS:
        return WMDP_TOPICS[subject]
    return subject.replace("_", " ").strip()


def _parse_answer(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise MCQDataError(f"{where}: field 'answer' must be an int index 0..3 or a letter A..D, got bool {value!r}")
    if isinstance(value, str):
        v = value.strip().upper()
        if v in LETTERS:
            return LETTERS.index(v)
        if v.isdigit():
            value = int(v)
        else:
            raise MCQDataError(
                f"{where}: field 'answer' is the string {value!r}; expected an int index 0..3 or a letter A..D"
            )
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int):
        raise MCQDataError(
            f"{where}: field 'answer' must be an int index 0..3, got {type(value).__name__} {value!r}"
        )
    if not 0 <= value < NUM_CHOICES:
        raise MCQDataError(f"{where}: field 'answer' = {value} is out of range; expected 0..{NUM_CHOICES - 1}")
    return value


def _validate_row(row: Any, where: str, default_subject: str) -> MCQItem:
    if not isinstance(row, Mapping):
        raise MCQDataError(f"{where}: expected an object with fields question, choices, answer; got {type(row).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in row]
    if missing:
        raise MCQDataError(
            f"{where}: missing field(s) {missing}; every row needs question (str), choices (list of 4 str), "
            f"answer (int 0..3), optionally subject (str). Fields present: {sorted(row)}"
        )
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise MCQDataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    choices = row["choices"]
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        # numpy / pyarrow arrays are not Sequences: convert when they can be listed
        if hasattr(choices, "tolist") and not isinstance(choices, str):
            choices = choices.tolist()
        else:
            raise MCQDataError(f"{where}: field 'choices' must be a list of {NUM_CHOICES} strings, got {choices!r}")
    choices = list(choices)
    if len(choices) != NUM_CHOICES:
        raise MCQDataError(f"{where}: field 'choices' has {len(choices)} options; exactly {NUM_CHOICES} are required")
    for j, c in enumerate(choices):
        if not isinstance(c, str):
            raise MCQDataError(f"{where}: field 'choices[{j}]' must be a string, got {type(c).__name__} {c!r}")
    answer = _parse_answer(row["answer"], where)
    subject = row.get("subject", None)
    if subject is None or subject == "":
        subject = default_subject
    if not isinstance(subject, str):
        raise MCQDataError(f"{where}: field 'subject' must be a string, got {type(subject).__name__} {subject!r}")
    return MCQItem(question=question, choices=tuple(choices), answer=answer, subject=subject)


def items_from_rows(rows: Iterable[Any], origin: str, default_subject: str = "") -> list[MCQItem]:
    """Validate rows (dicts) into MCQItems; errors name ``origin`` and the row index."""
    items = [_validate_row(row, f"{origin} row {i}", default_subject) for i, row in enumerate(rows)]
    if not items:
        raise MCQDataError(f"{origin}: no questions found")
    return items


def _read_local_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, Mapping) and "data" in data:
                data = data["data"]
            if not isinstance(data, list):
                raise MCQDataError(f"{path}: a .json file must hold a list of rows (or {{'data': [...]}})")
            return data
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MCQDataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            return rows
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except json.JSONDecodeError as e:
        raise MCQDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    raise MCQDataError(f"{path}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def load_mcq_file(path: str | Path, subject: str | None = None) -> list[MCQItem]:
    """Read a local json / jsonl / parquet file of MCQ rows.

    ``subject`` fills rows that carry none (default: the file stem).
    """
    path = Path(path)
    if not path.is_file():
        raise MCQDataError(f"{path}: file not found (expected a {'/'.join(LOCAL_SUFFIXES)} file of MCQ rows)")
    rows = _read_local_rows(path)
    return items_from_rows(rows, str(path), default_subject=subject if subject is not None else path.stem)


def _load_hub(hub_id: str, config: str, split: str) -> list[Any]:
    from alter_jax.data.hub import HubDatasetError, load_hub_dataset

    try:
        ds = load_hub_dataset(hub_id, config, split)
    except HubDatasetError as e:
        raise MCQDataError(
            f"could not load {hub_id!r} config {config!r} split {split!r} ({e}). Valid tasks: "
            f"{', '.join(WMDP_CONFIGS)}, mmlu, mmlu:<subject>, or a local {'/'.join(LOCAL_SUFFIXES)} file; offline, "
            "save the split as such a file and pass its path."
        ) from e
    return list(ds)


def load_wmdp(subset: str = "wmdp-bio", split: str = "test") -> list[MCQItem]:
    """WMDP from the hub (``cais/wmdp``); subset in ``WMDP_CONFIGS`` (``bio`` / ``cyber`` accepted)."""
    name = subset if subset.startswith("wmdp-") else f"wmdp-{subset}"
    if name not in WMDP_CONFIGS:
        raise MCQDataError(f"unknown WMDP subset {subset!r}; valid: {', '.join(WMDP_CONFIGS)}")
    rows = _load_hub(WMDP_HUB_ID, name, split)
    return items_from_rows(rows, f"{WMDP_HUB_ID}/{name}[{split}]", default_subject=name)


def load_mmlu(subject: str = "all", split: str = "test") -> list[MCQItem]:
    """MMLU from the hub (``cais/mmlu``); ``subject`` is a config name or ``all``."""
    rows = _load_hub(MMLU_HUB_ID, subject, split)
    return items_from_rows(rows, f"{MMLU_HUB_ID}/{subject}[{split}]", default_subject=subject if subject != "all" else "")


def load_mcq(source: str | Path, split: str = "test", limit: int | None = None) -> list[MCQItem]:
    """Resolve any MCQ source to items.

    ``source``: a local ``.json``/``.jsonl``/``.parquet`` path; ``wmdp-bio`` / ``wmdp-cyber`` /
    ``wmdp-chem``; ``mmlu`` (all subjects) or ``mmlu:<subject>``. ``limit`` keeps the first
    ``limit`` questions (smoke runs).
    """
    s = str(source)
    if Path(s).suffix.lower() in LOCAL_SUFFIXES or Path(s).exists():
        items = load_mcq_file(s)
    elif s in WMDP_CONFIGS or s in ("bio", "cyber", "chem"):
        items = load_wmdp(s, split)
    elif s == "mmlu" or s.startswith("mmlu:"):
        items = load_mmlu(s.split(":", 1)[1] if ":" in s else "all", split)
    else:
        raise MCQDataError(
            f"unknown MCQ source {s!r}: give a local {'/'.join(LOCAL_SUFFIXES)} file, one of "
            f"{', '.join(WMDP_CONFIGS)}, 'mmlu' or 'mmlu:<subject>'"
        )
    if limit is not None:
        items = items[: int(limit)]
    return items
