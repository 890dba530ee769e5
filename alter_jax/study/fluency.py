"""Fluency columns and example answers shared by the study reports (issue 19).

Every study row gets, for its forget and retain greedy answers, the degenerate-answer rate
(Eq. F4) and the mean perplexity of the generated answer under the study's reference backbone
(Eq. F1 on the generated tokens; ``eval.tofu.generation_fluency``), read back from the TOFU legacy
logs that ``eval.tofu.evaluate_split`` writes. Each method's *best setting* (the default or one
of its variants) is the one with the highest ``hmean(FQ, MU / MU_full)`` (0 when either is 0);
the report lists 3 forget and 3 retain answers of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

NUM_EXAMPLES = 3
SPLIT_FILES = {"forget": "eval_log_forget.json", "retain": "eval_log.json"}


def copy_idk_answers(tofu_dir: str | Path, data_dir: str | Path) -> bool:
    """Copy ``idontknow.jsonl`` from the TOFU folder into a study's data subset (what IdkNLL, IdkDPO and
    ALTER with ``loss.forget_target="idk"`` read), if the source has it and the subset does not;
    idempotent, so study folders built before it get the file too. Returns whether the subset has it."""
    src, dst = Path(tofu_dir) / "idontknow.jsonl", Path(data_dir) / "idontknow.jsonl"
    if not dst.is_file() and src.is_file() and Path(data_dir).is_dir():
        tmp = dst.with_name(dst.name + ".tmp")  # atomic: a second study worker may be reading the subset
        tmp.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(tmp, dst)
    return dst.is_file()


def log_fluency(log: Mapping[str, Any]) -> dict[str, float | None]:
    """Split-level fluency of one legacy log (``eval.tofu.fluency_summary``; all None when the
    log predates the fluency keys)."""
    from alter_jax.eval.tofu import FLUENCY_KEYS, fluency_summary

    nan = float("nan")
    per = {k: {i: (nan if v is None else v) for i, v in log[k].items()}
           for k in (*FLUENCY_KEYS, "generated_ppl") if k in log}
    return fluency_summary(per)


def folder_fluency(folder: str | Path) -> dict[str, Any]:
    """``{"forget_degenerate", "forget_gen_ppl", "forget_rep_4", "retain_degenerate", "retain_gen_ppl",
    "retain_rep_4", "examples": {"forget": [...], "retain": [...]}}`` from an evaluation folder's
    legacy logs; examples are ``[question prompt, generated, ground truth]``."""
    out: dict[str, Any] = {"examples": {}}
    for split, fname in SPLIT_FILES.items():
        f = Path(folder) / fname
        log = json.loads(f.read_text()) if f.is_file() else {}
        flu = log_fluency(log)
        out[f"{split}_degenerate"] = flu["degenerate_rate"]
        out[f"{split}_gen_ppl"] = flu["generated_ppl"]
        out[f"{split}_rep_4"] = flu["rep_4"]
        gen = log.get("generated_text", {})
        out["examples"][split] = [gen[k] for k in sorted(gen, key=int)[:NUM_EXAMPLES]]
    return out


def setting_score(fq: float | None, mu_rel: float | None) -> float:
    """``hmean(FQ, MU / MU_full)``, 0 when either is missing or 0: the best-setting criterion."""
    if not fq or not mu_rel or fq <= 0 or mu_rel <= 0:
        return 0.0
    return 2 * fq * mu_rel / (fq + mu_rel)


def best_settings(entries: Mapping[str, Mapping[str, Any]], fq_key: str = "forget_quality",
                  mu_key: str = "mu_vs_full") -> dict[str, str]:
    """``{method: entry name}``: per method the entry (default or variant) with the highest
    :func:`setting_score`; entries without a ``method`` (full / retain / untouched) are skipped."""
    best: dict[str, tuple[float, str]] = {}
    for name, e in entries.items():
        m = e.get("method")
        if not m:
            continue
        s = setting_score(e.get(fq_key), e.get(mu_key))
        if m not in best or s > best[m][0]:
            best[m] = (s, name)
    return {m: name for m, (_, name) in best.items()}


def _short(text: str, n: int = 160) -> str:
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def examples_markdown(entries: Mapping[str, Mapping[str, Any]], fq_key: str = "forget_quality",
                      mu_key: str = "mu_vs_full") -> list[str]:
    """Report lines: for every method's best setting, 3 forget and 3 retain greedy answers."""
    best = best_settings(entries, fq_key, mu_key)
    if not best:
        return []
    lines = ["## Example answers (each method's best setting: highest hmean(FQ, MU / full))", ""]
    for method, name in best.items():
        ex = entries[name].get("examples") or {}
        lines += [f"**{method}** (`{name}`)", "", "| split | generated | ground truth |", "|---|---|---|"]
        for split in ("forget", "retain"):
            for row in ex.get(split, []):
                lines.append(f"| {split} | {_short(row[1]) or '(empty)'} | {_short(row[2])} |")
        lines.append("")
    return lines
