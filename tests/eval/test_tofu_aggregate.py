"""TOFU aggregation reproduces the README figures from the published reference logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from alter_jax.eval.tofu import TofuLogsError, aggregate, read_logs

REPO = Path(__file__).resolve().parents[2]


def _independent(folder: Path, retain: Path):
    """README formulas written out with plain numpy / scipy, straight from the JSON files."""

    def load(d, f):
        return json.loads((d / f).read_text())

    def arr(log, key):
        return np.array([log[key][k] for k in sorted(log[key], key=int)], dtype=float)

    nums = []
    for f in ("eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json"):
        log = load(folder, f)
        if f == "eval_log.json":
            prob = np.mean(np.exp(-arr(log, "avg_gt_loss")))
        else:
            t = np.exp(-arr(log, "avg_gt_loss"))
            prob = np.mean(t / (t + np.exp(-arr(log, "average_perturb_loss")).sum(1)))
        rouge = np.mean(arr(log, "rougeL_recall"))
        r = np.exp(arr(log, "average_perturb_loss").mean(1) - arr(log, "avg_paraphrased_loss"))
        nums += [prob, rouge, np.mean(np.maximum(0, 1 - 1 / r))]

    def tr(d):
        log = load(d, "eval_log_forget.json")
        return np.exp(arr(log, "average_perturb_loss").mean(1) - arr(log, "avg_paraphrased_loss"))

    return hmean(nums), ks_2samp(tr(folder), tr(retain)).pvalue


@pytest.fixture(scope="module")
def refs(tofu_dir):
    base = tofu_dir / "reference_logs"
    return {m: base / f"llama2-7b_{m}_wd0" for m in ("full", "retain90", "retain95", "retain99")}


@pytest.mark.filterwarnings("ignore:forget quality")  # retain95/99 logs hold other forget splits
def test_readme_figures(refs):
    full = aggregate(refs["full"], refs["retain90"])
    r90 = aggregate(refs["retain90"], refs["retain90"])
    assert f"{full['model_utility']:.4f}" == "0.6268"
    assert f"{r90['model_utility']:.4f}" == "0.6203"
    assert f"{full['forget_quality']:.2e}" == "1.10e-19"
    assert r90["forget_quality"] == pytest.approx(1.0)
    assert len(full["parts"]) == 9 and all(0 < v <= 1 for v in full["parts"].values())
    for name in ("full", "retain90", "retain95", "retain99"):
        res = aggregate(refs[name], refs["retain90"])
        mu, fq = _independent(refs[name], refs["retain90"])
        assert res["model_utility"] == pytest.approx(mu, rel=1e-9, abs=0)
        assert res["forget_quality"] == pytest.approx(fq, rel=1e-9, abs=0)


def test_without_retain_and_errors(refs, tmp_path):
    res = aggregate(refs["full"])
    assert res["forget_quality"] is None and f"{res['model_utility']:.4f}" == "0.6268"
    with pytest.raises(TofuLogsError, match="does not exist"):
        read_logs(tmp_path / "missing")
    (tmp_path / "eval_log.json").write_text((refs["full"] / "eval_log.json").read_text())
    with pytest.raises(TofuLogsError, match="lacks eval_real_author_wo_options.json"):
        read_logs(tmp_path)
    # one aggregated file (TOFU's eval_log_aggregated.json) is read the same way
    agg = {f: json.loads((refs["full"] / f).read_text()) for f in os.listdir(refs["full"])}
    (tmp_path / "eval_log.json").unlink()
    (tmp_path / "eval_log_aggregated.json").write_text(json.dumps(agg))
    assert aggregate(tmp_path)["model_utility"] == pytest.approx(res["model_utility"], rel=1e-12)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_json(refs):
    p = _cli("tofu-aggregate", "--logs", str(refs["full"]), "--retain-logs", str(refs["retain90"]), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert f"{out['model_utility']:.4f}" == "0.6268"
    assert f"{out['forget_quality']:.2e}" == "1.10e-19"
    assert len(out["parts"]) == 9 and "Retain Truth Ratio" in out["parts"]
    p = _cli("tofu-aggregate", "--logs", str(refs["retain90"]))
    assert p.returncode == 0 and "Model Utility: 0.6203" in p.stdout
    p = _cli("tofu-aggregate", "--logs", str(refs["full"]) + "_nope")
    assert p.returncode == 2 and "error: TOFU log folder" in p.stderr and "Traceback" not in p.stderr
    p = _cli("--help")
    assert p.returncode == 0 and "tofu-aggregate" in p.stdout
