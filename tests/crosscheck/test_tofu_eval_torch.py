"""TOFU evaluator (our JAX model through LogitsFn / GenerateFn) vs an independent PyTorch
computation written the way TOFU's evaluate_util.py does it: per-question losses,
probabilities, truth ratios, normalised loss, greedy answers and ROUGE."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from rouge_score import rouge_scorer  # noqa: E402
from scipy.stats import hmean, ks_2samp  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from alter_jax.data.synthetic import train_toy_tokenizer  # noqa: E402
from alter_jax.data.tofu import load_tofu_split  # noqa: E402
from alter_jax.eval.tofu import aggregate, evaluate_split  # noqa: E402
from alter_jax.generate import model_fns  # noqa: E402
from alter_jax.io.hf import load_pretrained  # noqa: E402

N_ROWS = 3
MAX_LEN = 128
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tofu_dir, tmp_path_factory):
    forget = load_tofu_split("forget10_perturbed", tofu_dir)[:N_ROWS]
    real = load_tofu_split("real_authors_perturbed", tofu_dir)[:N_ROWS]
    texts = []
    for r in forget + real:
        texts += [f"[INST] {r['question']} [/INST]{r['answer']}", r.get("paraphrased_answer", ""), *r["perturbed_answer"]]
    tok = train_toy_tokenizer(texts, kind="llama2", vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.15, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    tm = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    tm.save_pretrained(d)
    logits_fn, generate_fn = model_fns(load_pretrained(d))
    return tok, tm, logits_fn, generate_fn, forget, real


# ---------------------------------------------------------------- independent reference (TOFU style)


def tofu_encode(tok, question, answer, max_length):
    """TOFU data_module.convert_raw_data_to_model_format for the Llama-2 tags."""
    new_question = "[INST] " + question + " [/INST]"
    full_text = new_question + answer
    n_q = len(tok.tokenize(new_question, add_special_tokens=True))
    enc = tok(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    pad = max_length - len(enc.input_ids)
    ids = enc.input_ids + [tok.eos_token_id] * pad
    mask = enc.attention_mask + [0] * pad
    label = enc.input_ids + [tok.eos_token_id] + [-100] * (pad - 1)
    for i in range(n_q):
        label[i] = -100
    return ids, mask, label


def torch_avg_losses(tok, tm, question, answers):
    enc = [tofu_encode(tok, question, a, MAX_LEN) for a in answers]
    ids, mask, labels = (torch.tensor([e[i] for e in enc]) for i in range(3))
    with torch.no_grad():
        logits = tm(ids, attention_mask=mask).logits
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    loss = ce(logits[:, :-1].transpose(-1, -2), labels[:, 1:]).sum(-1)
    return (loss / (labels != -100).sum(-1)).numpy().astype(np.float64)


def torch_generate(tok, tm, question):
    ids = tok("[INST] " + question + " [/INST]", add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        out = tm.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def reference(tok, tm, rows, real):
    ref = {"gt": [], "para": [], "pert": [], "gen": []}
    for r in rows:
        ref["gt"].append(torch_avg_losses(tok, tm, r["question"], [r["answer"]])[0])
        para = r["answer"] if real else r["paraphrased_answer"]
        ref["para"].append(torch_avg_losses(tok, tm, r["question"], [para])[0])
        ref["pert"].append(torch_avg_losses(tok, tm, r["question"], r["perturbed_answer"]))
        ref["gen"].append(torch_generate(tok, tm, r["question"]))
    return {k: np.array(v) if k != "gen" else v for k, v in ref.items()}


def values(log, key):
    return np.array([log[key][k] for k in sorted(log[key], key=int)], dtype=np.float64)


@pytest.mark.parametrize("task", ["eval_log_forget", "eval_real_author_wo_options"])
def test_tofu_metrics_match_torch(setup, task):
    tok, tm, logits_fn, generate_fn, forget, real_rows = setup
    real = task == "eval_real_author_wo_options"
    rows = real_rows if real else forget
    log = evaluate_split(rows, task, logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tok, fmt="llama2",
                         max_length=MAX_LEN, batch_size=2, max_new_tokens=NEW_TOKENS)
    json.dumps(log)  # legacy log is JSON-serialisable
    ref = reference(tok, tm, rows, real)

    np.testing.assert_allclose(values(log, "avg_gt_loss"), ref["gt"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values(log, "avg_paraphrased_loss"), ref["para"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values(log, "average_perturb_loss"), ref["pert"], rtol=1e-5, atol=1e-5)
    assert values(log, "average_perturb_loss").shape == (N_ROWS, 3 if real else 5)
    # probabilities and truth ratios (TOFU log: exp(para - mean pert); aggregate r is its inverse)
    np.testing.assert_allclose(np.exp(-values(log, "avg_gt_loss")), np.exp(-ref["gt"]), rtol=1e-5)
    np.testing.assert_allclose(values(log, "truth_ratio"), np.exp(ref["para"] - ref["pert"].mean(1)), rtol=1e-5)
    if real:
        p_t = np.exp(-ref["gt"])
        norm = -np.log(p_t / (p_t + np.exp(-ref["pert"]).sum(1)))
        np.testing.assert_allclose(values(log, "normalized_gt_loss"), norm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values(log, "avg_paraphrased_loss"), values(log, "avg_gt_loss"))
    # the losses are not all alike (a meaningful check on a random model)
    assert np.ptp(ref["pert"]) > 0.05
    # greedy answers equal transformers.generate; ROUGE-L recall recomputed with rouge_score
    gens = [log["generated_text"][str(i)][1] for i in range(N_ROWS)]
    assert gens == ref["gen"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [scorer.score(r["answer"], g)["rougeL"].recall for r, g in zip(rows, ref["gen"])]
    np.testing.assert_allclose(values(log, "rougeL_recall"), rl)
    assert log["generated_text"]["0"][0] == "[INST] " + rows[0]["question"] + " [/INST]"


def test_aggregate_on_own_logs(setup, tmp_path):
    """Our logs feed the same aggregation reader; numbers match scipy on the reference values."""
    tok, tm, logits_fn, generate_fn, forget, real_rows = setup
    common = dict(logits_fn=logits_fn, generate_fn=generate_fn, tokenizer=tok, fmt="llama2", max_length=MAX_LEN,
                  batch_size=4, max_new_tokens=4)
    logs = {
        "eval_log_forget": evaluate_split(forget, "eval_log_forget", **common),
        "eval_log": evaluate_split(forget, "eval_log", **common),
        "eval_real_author_wo_options": evaluate_split(real_rows, "eval_real_author_wo_options", **common),
        "eval_real_world_wo_options": evaluate_split(real_rows, "eval_real_world_wo_options", **common),
    }
    for name, log in logs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(log))
    res = aggregate(tmp_path, tmp_path)
    assert res["forget_quality"] == pytest.approx(1.0)
    ref_f = reference(tok, tm, forget, False)
    ref_r = reference(tok, tm, real_rows, True)
    r_f = np.exp(ref_f["pert"].mean(1) - ref_f["para"])
    r_r = np.exp(ref_r["pert"].mean(1) - ref_r["para"])
    p_r = np.exp(-ref_r["gt"]) / (np.exp(-ref_r["gt"]) + np.exp(-ref_r["pert"]).sum(1))
    assert res["forget"]["Forget Truth Ratio"] == pytest.approx(np.mean(np.minimum(r_f, 1 / r_f)), rel=1e-5)
    assert res["parts"]["Retain Prob."] == pytest.approx(np.mean(np.exp(-ref_f["gt"])), rel=1e-5)
    assert res["parts"]["Real Authors Prob."] == pytest.approx(np.mean(p_r), rel=1e-5)
    assert res["parts"]["Real World Truth Ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - 1 / r_r)), rel=1e-5, abs=1e-7)
    assert res["model_utility"] == pytest.approx(hmean(list(res["parts"].values())), rel=1e-12)
    assert ks_2samp(r_f, r_f).pvalue == pytest.approx(res["forget_quality"])
