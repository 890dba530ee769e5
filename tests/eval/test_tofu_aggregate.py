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


def test_cli_tofu_end_to_end_on_synthetic(tmp_path):
    """`evaluate tofu` on a tiny random model and a synthetic TOFU folder, then
    `tofu-aggregate` on the logs it wrote (our output folder = legacy layout)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from alter_jax.data.synthetic import generate_authors, train_toy_tokenizer, write_tofu_folder

    data = tmp_path / "tofu"
    write_tofu_folder(data, num_authors=10, forget_authors=1, seed=0, per_author=4)
    tok = train_toy_tokenizer([r["question"] + " " + r["answer"] for r in generate_authors(10, seed=0, per_author=4)],
                              kind="llama2", vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "eval"
    p = _cli("tofu", "--model", str(model_dir), "--data", str(data), "--forget-split", "forget10", "--out", str(out),
             "--prompt-format", "llama2", "--ds-size", "3", "--batch-size", "4", "--max-length", "96",
             "--max-new-tokens", "4", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["prompt_format"] == "llama2" and len(summary["parts"]) == 9
    logs = read_logs(out)
    assert len(logs["eval_log_forget.json"]["avg_gt_loss"]) == 3
    assert len(logs["eval_real_world_wo_options.json"]["average_perturb_loss"]["0"]) == 3
    p = _cli("tofu-aggregate", "--logs", str(out), "--retain-logs", str(out), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["forget_quality"] == pytest.approx(1.0)
    assert res["model_utility"] == pytest.approx(summary["model_utility"])
    p = _cli("tofu", "--model", str(model_dir), "--data", str(data), "--forget-split", "forget07", "--out", str(out))
    assert p.returncode == 2 and "forget07_perturbed" in p.stderr and "available splits" in p.stderr


def test_nan_in_a_log_names_the_file_and_the_metric(refs, tmp_path):
    """issue 14: a NaN in a TOFU log printed ``Model Utility: nan`` with exit 0."""
    import shutil

    logs = tmp_path / "logs"
    shutil.copytree(refs["full"], logs)
    f = logs / "eval_real_author_wo_options.json"
    log = json.loads(f.read_text())
    key = sorted(log["rougeL_recall"], key=int)[3]
    log["rougeL_recall"][key] = float("nan")
    f.write_text(json.dumps(log))
    before = f.read_bytes()
    p = _cli("tofu-aggregate", "--logs", str(logs))
    assert p.returncode == 2, p.stdout
    assert (f"error: {f}: metric 'rougeL_recall' is NaN or inf for 1 of {len(log['rougeL_recall'])} questions "
            f"(first: question {key})") in p.stderr, p.stderr
    assert "Model Utility" not in p.stdout and "Traceback" not in p.stderr
    g = logs / "eval_log_forget.json"  # the forget log (Forget Quality) is checked as well
    f.write_bytes((refs["full"] / f.name).read_bytes())
    log = json.loads(g.read_text())
    log["avg_paraphrased_loss"][sorted(log["avg_paraphrased_loss"], key=int)[0]] = float("inf")
    g.write_text(json.dumps(log))
    with pytest.raises(TofuLogsError, match=rf"{g}: metric 'avg_paraphrased_loss' is NaN or inf"):
        aggregate(logs, refs["retain90"])
    assert before != f.read_bytes()  # (the restored file differs from the NaN one; nothing else was written)
    assert sorted(x.name for x in logs.iterdir()) == sorted(x.name for x in refs["full"].iterdir())
