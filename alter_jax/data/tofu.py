"""TOFU splits: loading (hub id or local folder), schema validation, author blocks.

A split is a list of row dicts. Local folders hold one JSON Lines file per split
(``<name>.json`` or ``<name>.jsonl``, the layout of ``locuslab/TOFU``); a hub id goes
through ``datasets.load_dataset(hub_id, name, split="train")``. Both end in the same
validation.

Schemas (checked per split kind, from the split name):

- plain (``full``, ``forgetXX``, ``retainYY``): ``question``, ``answer`` (strings).
- perturbed (``forgetXX_perturbed``, ``retain_perturbed``): + ``paraphrased_answer``,
  ``paraphrased_question`` (strings), ``perturbed_answer`` (list of 5 strings).
- real (``real_authors_perturbed``, ``world_facts_perturbed``): ``question``,
  ``answer``, ``perturbed_answer`` (list of 3 strings); no paraphrase (TOFU scores the
  answer itself as the "paraphrased" answer there).

Extra fields (e.g. ``domain``) are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

DEFAULT_SOURCE = "locuslab/TOFU"

PLAIN_FIELDS = ("question", "answer")
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question")
REAL_FIELDS = ("question", "answer", "perturbed_answer")
REAL_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")

# TOFU's four evaluation tasks: legacy log name -> split (forget split filled in).
EVAL_TASKS = {
    "eval_log_forget": "{forget}_perturbed",
    "eval_log": "retain_perturbed",
    "eval_real_author_wo_options": "real_authors_perturbed",
    "eval_real_world_wo_options": "world_facts_perturbed",
}


class TofuDataError(ValueError):
    """Bad or missing TOFU data (message names file, row, field and the fix)."""


def split_kind(name: str) -> str:
    """``"plain"``, ``"perturbed"`` or ``"real"`` from a split name."""
    if name in REAL_SPLITS:
        return "real"
    if name.endswith("_perturbed"):
        return "perturbed"
    return "plain"


def expected_num_perturbed(name: str) -> int | None:
    """TOFU's number of perturbed answers for a split (5 synthetic, 3 real), None if plain."""
    kind = split_kind(name)
    return {"perturbed": 5, "real": 3}.get(kind)


def retain_split_for(forget_split: str) -> str:
    """``forget10`` -> ``retain90`` (TOFU's complement naming)."""
    base = forget_split.replace("_perturbed", "")
    if not base.startswith("forget") or not base[6:].isdigit():
        raise TofuDataError(f"forget split name {forget_split!r} is not of the form forgetXX (e.g. forget10)")
    return f"retain{100 - int(base[6:]):02d}"


def _is_local(source: str) -> bool:
    """A path (existing, or starting with . / ~, or not of the form owner/name) vs a hub id."""
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        return True
    parts = source.split("/")
    return not (len(parts) == 2 and all(parts))


def available_splits(folder: str | os.PathLike) -> list[str]:
    """Split names present in a local TOFU folder (``*.json`` / ``*.jsonl`` stems)."""
    p = Path(folder)
    return sorted({f.stem for f in p.iterdir() if f.suffix in (".json", ".jsonl") and f.is_file()})


def _read_local(folder: Path, name: str) -> tuple[list[dict], str]:
    if not folder.is_dir():
        raise TofuDataError(f"TOFU folder {folder} does not exist (pass a folder of <split>.json files or a hub id)")
    for ext in (".json", ".jsonl"):
        path = folder / f"{name}{ext}"
        if path.is_file():
            break
    else:
        raise TofuDataError(
            f"split {name!r} not found in {folder}: no {name}.json or {name}.jsonl; "
            f"available splits: {', '.join(available_splits(folder)) or '(none)'}"
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise TofuDataError(f"{path} is empty: expected one JSON object per line with fields question, answer, ...")
    stripped = text.lstrip()
    rows: list[Any]
    if stripped.startswith("["):  # a JSON array file
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise TofuDataError(f"{path}: not valid JSON ({e}); expected JSON lines or a JSON array of objects") from e
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TofuDataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or remove that line") from e
    if not rows:
        raise TofuDataError(f"{path} holds no rows")
    return rows, str(path)


def _read_hub(hub_id: str, name: str) -> tuple[list[dict], str]:
    from alter_jax.data.hub import HubDatasetError, load_hub_dataset

    try:
        ds = load_hub_dataset(hub_id, name, "train")
    except HubDatasetError as e:
        hint = "check the split name, or pass" if e.reachable else "pass"
        raise TofuDataError(
            f"could not load split {name!r} of {hub_id!r} ({e}); {hint} a local TOFU folder "
            f"(no folder named {hub_id!r} exists here)"
        ) from e
    rows = [dict(r) for r in ds]
    if not rows:
        raise TofuDataError(f"split {name!r} of {hub_id!r} is empty")
    return rows, f"{hub_id}:{name}"


def validate_rows(rows: Sequence[Any], name: str, origin: str = "<rows>", num_perturbed: int | None = None) -> None:
    """Check a split's rows against its schema; raise :class:`TofuDataError` naming the
    file/origin, the row (0-based), the field and the fix."""
    kind = split_kind(name)
    fields = {"plain": PLAIN_FIELDS, "perturbed": PERTURBED_FIELDS, "real": REAL_FIELDS}[kind]
    n_pert = num_perturbed if num_perturbed is not None else expected_num_perturbed(name)
    if not rows:
        raise TofuDataError(f"{origin}: split {name!r} has no rows")
    for i, row in enumerate(rows):
        where = f"{origin}, row {i}"
        if not isinstance(row, dict):
            raise TofuDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for f in fields:
            if f not in row or row[f] is None:
                raise TofuDataError(
                    f"{where}: missing field {f!r} (a {kind} split like {name!r} needs {', '.join(fields)}); "
                    f"add it or check that the file is the right split"
                )
            v = row[f]
            if f == "perturbed_answer":
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise TofuDataError(f"{where}: field 'perturbed_answer' must be a list of strings, got {type(v).__name__}")
                empty = [j for j, x in enumerate(v) if not x.strip()]
                if empty:
                    raise TofuDataError(f"{where}: field 'perturbed_answer' entry {empty[0]} is empty; an empty answer "
                                        "scores no tokens and distorts every figure: fill it in or remove the row")
                if n_pert is not None and len(v) != n_pert:
                    raise TofuDataError(
                        f"{where}: field 'perturbed_answer' has {len(v)} answers, expected {n_pert} for split "
                        f"{name!r} (TOFU: 5 for forget/retain perturbed, 3 for real_authors/world_facts); "
                        "fix the row or pass num_perturbed"
                    )
            elif not isinstance(v, str):
                raise TofuDataError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")
            elif not v.strip():
                raise TofuDataError(f"{where}: field {f!r} is empty; an empty {f.replace('_', ' ')} scores no tokens and "
                                    "distorts every figure (a forget prob of 0.50 instead of 0.99): fill it in or remove "
                                    "the row")


def load_tofu_split(
    name: str,
    source: str | os.PathLike = DEFAULT_SOURCE,
    num_perturbed: int | None = None,
) -> list[dict]:
    """Rows of one TOFU split, validated.

    ``source`` is a local folder (``<name>.json`` JSON lines, TOFU layout) or a hub id
    (``"locuslab/TOFU"``). ``num_perturbed`` overrides the expected length of
    ``perturbed_answer`` (default: 5, or 3 for real_authors/world_facts).
    """
    src = os.path.expanduser(str(source))
    if _is_local(src):
        rows, origin = _read_local(Path(src), name)
    else:
        rows, origin = _read_hub(src, name)
    validate_rows(rows, name, origin, num_perturbed)
    return rows


def load_idk(source: str | os.PathLike) -> list[str]:
    """Refusal answers from ``idontknow.jsonl`` in a local TOFU folder (one per line)."""
    path = Path(os.path.expanduser(str(source))) / "idontknow.jsonl"
    if not path.is_file():
        raise TofuDataError(f"{path} not found (needed for refusal-answer baselines)")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise TofuDataError(f"{path} is empty")
    return lines


def pair_idk(rows: Sequence[dict], answers: Sequence[str], seed: int = 0) -> list[dict]:
    """The rows with ``answer`` replaced by an "I don't know" answer drawn uniformly from ``answers``
    (one fixed draw per row, ``numpy.random.default_rng([seed, 19])``; open-unlearning's
    ``QAwithIdkDataset`` redraws at every fetch, a fixed draw keeps runs resumable and bitwise
    reproducible). Other fields are kept; ``idk_index`` names the answer drawn."""
    import numpy as np

    if not answers:
        raise TofuDataError("pair_idk: no 'I don't know' answers given")
    pick = np.random.default_rng([seed, 19]).integers(0, len(answers), size=len(rows))
    return [{**r, "answer": answers[int(k)], "idk_index": int(k)} for r, k in zip(rows, pick)]


def author_blocks(rows: Sequence[dict], per_author: int = 20) -> list[list[dict]]:
    """Split rows into consecutive author blocks of ``per_author`` rows (TOFU: 20)."""
    if per_author < 1:
        raise ValueError(f"per_author must be >= 1, got {per_author}")
    if len(rows) % per_author:
        raise TofuDataError(
            f"{len(rows)} rows are not a whole number of authors of {per_author} rows each; "
            "check per_author or the split"
        )
    return [list(rows[i:i + per_author]) for i in range(0, len(rows), per_author)]
