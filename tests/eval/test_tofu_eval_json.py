"""open-unlearning's TOFU_EVAL.json both ways, the --json metrics object, --help, and the
generation / scope / system-prompt defaults of the TOFU evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from alter_jax.eval.tofu import (LOG_FILES, OU_EVAL_FILE, PER_SPLIT_METRICS, aggregate, generate_answers, read_logs,
                                 tofu_eval_from_logs)

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("forget", "retain", "real_authors", "world_facts")
ATTACK_KEYS = [f"mia_{a}_auc" for a in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")]


@pytest.fixture(scope="module")
def refs(tofu_dir):
    base = tofu_dir / "reference_logs"
    return {m: base / f"llama2-7b_{m}_wd0" for m in ("full", "retain90")}


def _legacy(folder):
    return {f[:-5]: json.loads((folder / f).read_text()) for f in LOG_FILES}


def test_round_trip_reproduces_forget_quality_exactly(refs, tmp_path):
    """TOFU's published retain90 logs -> our TOFU_EVAL.json -> read back as retain logs."""
    ou = tofu_eval_from_logs(_legacy(refs["retain90"]))
    (tmp_path / OU_EVAL_FILE).write_text(json.dumps(ou, indent=4))
    legacy = aggregate(refs["full"], refs["retain90"])
    via_ou = aggregate(refs["full"], tmp_path)
    via_file = aggregate(refs["full"], tmp_path / OU_EVAL_FILE)
    assert via_ou["forget_quality"] == legacy["forget_quality"] == via_file["forget_quality"]
    assert f"{legacy['forget_quality']:.2e}" == "1.10e-19"
    # the whole model side read from TOFU_EVAL.json: the same Model Utility up to TOFU's own
    # logs, whose real-author "paraphrased" losses (= the answer, rescored in another batch) differ
    # from avg_gt_loss by up to 0.05; open-unlearning's ra/wf truth ratio uses the answer's loss
    assert aggregate(tmp_path)["model_utility"] == pytest.approx(aggregate(refs["retain90"])["model_utility"],
                                                                 abs=1e-4)
    keys = set(ou)
    assert {"forget_truth_ratio", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "retain_Truth_Ratio",
            "ra_Q_A_Prob_normalised", "wf_Truth_Ratio", "forget_Q_A_ROUGE"} <= keys
    assert ou["forget_truth_ratio"]["value_by_index"]["0"].keys() == {"score"}
    assert len(ou["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["avg_loss"]) == 5


def test_open_unlearning_style_file_gives_their_forget_quality(refs, tmp_path):
    """A file holding only what open-unlearning's ks_test reads (forget_truth_ratio scores,
    written here the way their truth_ratio metric computes them): our Forget Quality equals
    their ks_2samp(model scores, retain scores)."""

    def ou_scores(folder):
        log = json.loads((folder / "eval_log_forget.json").read_text())
        idx = sorted(log["avg_paraphrased_loss"], key=int)
        correct = np.exp(-np.array([log["avg_paraphrased_loss"][i] for i in idx]))
        wrong = np.exp(-np.array([np.mean(log["average_perturb_loss"][i]) for i in idx]))
        return idx, wrong / (correct + 1e-10)

    idx, retain_scores = ou_scores(refs["retain90"])
    _, model_scores = ou_scores(refs["full"])
    data = {"forget_truth_ratio": {"agg_value": 0.0, "value_by_index": {i: {"score": float(s)}
                                                                       for i, s in zip(idx, retain_scores)}}}
    (tmp_path / OU_EVAL_FILE).write_text(json.dumps(data))
    theirs = ks_2samp(model_scores, retain_scores).pvalue
    ours = aggregate(refs["full"], tmp_path)["forget_quality"]
    assert ours == pytest.approx(theirs, rel=1e-12)
    logs = read_logs(tmp_path, required=("eval_log_forget.json",))
    assert set(logs) == {"eval_log_forget.json"}


def test_generation_budget_and_scope_defaults():
    from alter_jax.data.synthetic import train_toy_tokenizer

    tok = train_toy_tokenizer(["Question: who wrote it?\nAnswer: nobody knows"], kind="llama2", vocab_size=120)
    asked = []

    def gen(ids, mask, n):
        asked.append(n)
        return np.full((ids.shape[0], n), tok.eos_token_id, np.int32)

    generate_answers(gen, tok, ["who wrote it?"], "plain", batch_size=2)
    generate_answers(gen, tok, ["who wrote it?"], "plain", batch_size=2, generation_max_length=40)
    assert asked[0] == 200  # new tokens, as open-unlearning / transformers
    assert asked[1] == 40 - 16  # TOFU's prompt-inclusive budget only on request (prompt bucket 16)
    import inspect

    from alter_jax.eval.tofu import evaluate_tofu

    sig = inspect.signature(evaluate_tofu).parameters
    assert sig["ds_size"].default is None and sig["max_new_tokens"].default == 200


def test_system_prompt_presets():
    from alter_jax.data.prompts import SYSTEM_PROMPTS, encode_prompt, prompt_text, resolve_format, with_system_prompt
    from alter_jax.data.synthetic import train_toy_tokenizer

    tok = train_toy_tokenizer(["who wrote it? nobody knows"], kind="chatml", vocab_size=200)
    text, _ = prompt_text(tok, "who?", "chatml@helpful")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nwho?")
    assert prompt_text(tok, "who?", "chatml")[0].startswith("<|im_start|>user")
    f = with_system_prompt("chatml", tok, "Llama-3.2-1B-Instruct")
    assert (f.system_prompt, f.date_string) == ("You are a helpful assistant.", "10 Apr 2025")
    assert with_system_prompt("chatml", tok, "Be brief.").system_prompt == "Be brief."
    assert SYSTEM_PROMPTS["Qwen2.5-1.5B-Instruct"] == ("You are a helpful assistant.", None)
    # the date reaches a template that uses it (Llama-3.1 style)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}"
                         "{% if date_string is defined %}date:{{ date_string }}{% endif %}")
    assert "date:10 Apr 2025" in prompt_text(tok, "who?", "chat@helpful-dated")[0]
    assert len(encode_prompt(tok, "who?", resolve_format("chat@helpful", tok))) > len(encode_prompt(tok, "who?", "chat"))
    with pytest.raises(ValueError, match="no chat template"):
        with_system_prompt("llama2", tok, "helpful")
    with pytest.raises(ValueError, match="unknown system prompt preset"):
        resolve_format("chat@nope", tok)


def _cli(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_help_lists_every_metric():
    p = _cli("tofu", "--help", timeout=120)
    assert p.returncode == 0, p.stderr
    for key in (*PER_SPLIT_METRICS, *ATTACK_KEYS, "privleak", "forget_quality", "model_utility", "aggregate"):
        assert key in p.stdout, key


def test_cli_json_object_and_tofu_eval_as_retain_logs(tmp_path):
    """`evaluate tofu --json` on a tiny random model and a synthetic TOFU folder with a
    holdout10 split: every key, every attack, then its own TOFU_EVAL.json as retain logs."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from alter_jax.data.synthetic import generate_authors, train_toy_tokenizer, write_tofu_folder

    data = tmp_path / "tofu"
    write_tofu_folder(data, num_authors=10, forget_authors=1, seed=0, per_author=4)
    other = generate_authors(12, seed=1, per_author=4)[-4:]  # authors the model never saw
    (data / "holdout10.json").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                                 for r in other))
    tok = train_toy_tokenizer([r["question"] + " " + r["answer"] for r in generate_authors(12, seed=0, per_author=4)],
                              kind="llama2", vocab_size=300)
    models = {}
    for name, seed in (("model", 0), ("ref", 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        models[name] = tmp_path / name
        LlamaForCausalLM(cfg).save_pretrained(models[name])
        tok.save_pretrained(models[name])
    out, res_file = tmp_path / "eval", tmp_path / "metrics.json"
    common = ["--data", str(data), "--forget-split", "forget10", "--prompt-format", "llama2", "--batch-size", "4",
              "--max-length", "96", "--max-new-tokens", "4", "--no-progress"]
    p = _cli("tofu", "--model", str(models["model"]), "--out", str(out), "--json", str(res_file),
             "--reference-model", str(models["ref"]), "--paraphrased-questions", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(res_file.read_text())
    for split in (*SPLITS, "forget_paraphrased_question", "retain_paraphrased_question"):
        assert set(m[split]) == set(PER_SPLIT_METRICS), split
        # generated_ppl is None only when every greedy answer is empty (a random model may stop at once)
        ppl_keys = ("generated_ppl", "generated_ppl_median")
        assert all(isinstance(m[split][k], float) for k in PER_SPLIT_METRICS if k not in ppl_keys), (split, m[split])
        assert all(isinstance(m[split][k], float) or m[split]["degenerate_rate"] == 1.0 for k in ppl_keys), m[split]
    for key in ATTACK_KEYS:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["holdout"].startswith("holdout10") and m["forget_quality"] is None and m["aggregate"] is None
    assert isinstance(m["privleak"], float) and "default" in m["privleak_reference"]
    assert (out / OU_EVAL_FILE).is_file() and (out / "TOFU_SUMMARY.json").is_file()
    assert (out / "eval_log_forget.json").is_file()
    # all rows scored by default
    assert len(json.loads((out / "eval_log_forget.json").read_text())["avg_gt_loss"]) == 4
    # the written TOFU_EVAL.json as retain logs: the same model gives FQ 1, PrivLeak 0
    p = _cli("tofu", "--model", str(models["model"]), "--out", str(tmp_path / "eval2"), "--json", str(res_file),
             "--retain-logs", str(out / OU_EVAL_FILE), "--attacks", "min_k", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    m2 = json.loads(res_file.read_text())
    assert m2["forget_quality"] == pytest.approx(1.0) and m2["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert m2["mia_min_k_auc"] == m["mia_min_k_auc"] and m2["mia_loss_auc"] is None
    fq, mu = m2["forget_quality"], m2["model_utility"]  # a random model's MU can be 0 (no ROUGE overlap)
    assert m2["aggregate"] == (pytest.approx(2 * fq * mu / (fq + mu)) if mu > 0 else 0.0)
    # tofu-aggregate reads the same folder back, MIA included
    p = subprocess.run([sys.executable, str(REPO / "bin" / "evaluate"), "tofu-aggregate", "--logs", str(out), "--json"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["metrics"]["mia_zlib_auc"] == m["mia_zlib_auc"]
    # our own logs round-trip through TOFU_EVAL.json exactly (Model Utility too)
    assert aggregate(out / OU_EVAL_FILE)["model_utility"] == aggregate(out)["model_utility"]
    assert aggregate(out, out / OU_EVAL_FILE)["forget_quality"] == aggregate(out, out)["forget_quality"]


def test_holdout_resolution(tmp_path):
    from alter_jax.data.synthetic import write_tofu_folder
    from alter_jax.data.tofu import load_tofu_split
    from alter_jax.eval.tofu import holdout_split_for, resolve_holdout

    write_tofu_folder(tmp_path, num_authors=10, forget_authors=1, seed=0, per_author=4)
    assert holdout_split_for("forget10_perturbed") == "holdout10" and holdout_split_for("forget") is None
    rows, name = resolve_holdout("auto", "forget10", tmp_path, 4)
    assert rows is None and "holdout10 not in" in name and "full:A-B" in name  # like ../shared/data/tofu
    rows, name = resolve_holdout("full:2-3", "forget10", tmp_path, 4, per_author=4)
    full = load_tofu_split("full", tmp_path)
    assert rows == full[8:12] and name == "full.json authors 2-3 (4 rows)"
    (tmp_path / "holdout10.json").write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n"
                                                     for i in range(6)))
    rows, name = resolve_holdout("auto", "forget10", tmp_path, 4)
    assert [r["question"] for r in rows] == ["q0?", "q1?", "q2?", "q3?"] and name == "holdout10 (4 rows)"
    assert resolve_holdout("none", "forget10", tmp_path, 4)[0] is None
    with pytest.raises(ValueError, match="full.json has authors 0..9"):
        resolve_holdout("full:8-12", "forget10", tmp_path, 4, per_author=4)
    with pytest.raises(ValueError, match="expected full:A-B"):
        resolve_holdout("full:x", "forget10", tmp_path, 4)
    with pytest.raises(ValueError, match="holdout05"):
        resolve_holdout("holdout05", "forget10", tmp_path, 4)
