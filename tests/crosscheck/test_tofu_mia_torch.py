"""Exact Memorization, Extraction Strength, every membership-inference score and its AUC,
PrivLeak and the prob_mean truth ratio: our JAX evaluator (through LogitsFn / GradNormFn)
against an independent PyTorch computation written here the way open-unlearning's
``evals/metrics`` compute them (one example at a time, no padding), on tiny random Llamas."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from alter_jax.data.synthetic import train_toy_tokenizer  # noqa: E402
from alter_jax.data.tofu import load_tofu_split  # noqa: E402
from alter_jax.eval import mia as M  # noqa: E402
from alter_jax.eval.memorization import memorization_scores, token_stats  # noqa: E402
from alter_jax.eval.tofu import evaluate_split, qa_token_stats, run_mia, truth_ratio_prob_mean  # noqa: E402
from alter_jax.generate import model_fns  # noqa: E402
from alter_jax.gradnorm import model_gradnorm_fn  # noqa: E402
from alter_jax.io.hf import load_pretrained  # noqa: E402

N = 4
MAX_LEN = 256  # no row is truncated (open-unlearning: 512)
TOL = dict(rtol=1e-5, atol=1e-5)


def _tiny(tok, seed, d):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.15, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    tm = LlamaForCausalLM(cfg).eval()
    tm.save_pretrained(d)
    return tm


@pytest.fixture(scope="module")
def setup(tofu_dir, tmp_path_factory):
    forget = load_tofu_split("forget10_perturbed", tofu_dir)[:N]
    holdout = load_tofu_split("retain_perturbed", tofu_dir)[:N]
    texts = []
    for r in forget + holdout:
        texts += [f"[INST] {r['question']} [/INST]{r['answer']}", r["paraphrased_answer"], *r["perturbed_answer"]]
    tok = train_toy_tokenizer(texts, kind="llama2", vocab_size=300)
    d, dr = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("reference")
    tm, tref = _tiny(tok, 0, d), _tiny(tok, 1, dr)
    # half the forget answers are the model's own greedy continuation (teacher-forced argmax
    # then matches on a prefix or everywhere): EM and ES take values other than 0 and 1/n
    for i, r in enumerate(forget[:2]):
        ids = tok("[INST] " + r["question"] + " [/INST]", return_tensors="pt")
        with torch.no_grad():
            out = tm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        greedy = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        forget[i] = {**r, "answer": greedy if i == 0 else greedy + " " + r["answer"]}
    jm = load_pretrained(d)
    lf, _ = model_fns(jm)
    ref_lf, _ = model_fns(load_pretrained(dr))
    return tok, tm, tref, jm, lf, ref_lf, forget, holdout


# ----------------------------------------------------------- independent reference (open-unlearning style)


def ou_encode(tok, question, answer):
    """open-unlearning preprocess_chat_instance, no chat template, Llama-2 tags."""
    prompt = "[INST] " + question + " [/INST]"
    chat_ids = tok(prompt + answer, add_special_tokens=True)["input_ids"]
    if chat_ids[-1] != tok.eos_token_id:
        chat_ids = chat_ids + [tok.eos_token_id]
    n_prompt = len(tok(prompt, add_special_tokens=True)["input_ids"])
    labels = [-100] * n_prompt + chat_ids[n_prompt:]
    return torch.tensor([chat_ids]), torch.tensor([labels])


def torch_row(tm, tok, question, answer, grad=False):
    ids, labels = ou_encode(tok, question, answer)
    with torch.set_grad_enabled(grad):
        logits = tm(ids).logits
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    avg_loss = ce(logits[0, :-1].double(), labels[0, 1:]).sum() / (labels != -100).sum()
    lp_vocab = torch.log_softmax(logits, -1)[0, :-1]
    actual = (labels[0] != -100).nonzero(as_tuple=True)[0][:-1]  # drop the EOS
    s, e = actual[0].item(), actual[-1].item()
    vlp = lp_vocab[s - 1:e]
    tgt = labels[0, actual]
    tlp = vlp.gather(1, tgt[:, None])[:, 0]
    return dict(avg_loss=avg_loss, vlp=vlp, tlp=tlp, tgt=tgt, labels=labels)


def torch_em_es(r):
    preds = r["vlp"].argmax(-1)
    n = len(r["tgt"])
    em = ((preds == r["tgt"]).sum() / n).item()
    for k in range(n):
        if torch.equal(preds[k:], r["tgt"][k:]):
            break
    return em, 1 - k / n


def torch_scores(tm, tref, tok, rows, k=0.4):
    out = {a: [] for a in M.ATTACKS}
    for row in rows:
        r = torch_row(tm, tok, row["question"], row["answer"])
        loss = r["avg_loss"].item()
        out["loss"].append(loss)
        text = tok.decode(r["labels"][0][r["labels"][0] != -100].tolist(), skip_special_tokens=True)
        out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
        lp = r["tlp"].double().numpy()
        nk = max(1, int(len(lp) * k))
        out["min_k"].append(-np.mean(np.sort(lp)[:nk]))
        p = r["vlp"].double().exp()
        mu = (p * r["vlp"].double()).sum(-1)
        sigma = torch.clamp((p * r["vlp"].double() ** 2).sum(-1) - mu ** 2, min=1e-6)
        z = ((r["tlp"].double() - mu) / sigma.sqrt()).numpy()
        out["min_k_plus_plus"].append(-np.mean(np.sort(z)[:nk]))
        out["reference"].append(loss - torch_row(tref, tok, row["question"], row["answer"])["avg_loss"].item())
        tm.zero_grad()
        g = torch_row(tm, tok, row["question"], row["answer"], grad=True)
        (-g["tlp"].mean()).backward()
        norms = [q.grad.detach().norm(p=2) for q in tm.parameters() if q.grad is not None]
        out["gradnorm"].append(torch.stack(norms).mean().item())
    return {a: np.array(v) for a, v in out.items()}


def pairwise_auc(forget, holdout):
    """roc_auc_score(labels=[0]*F + [1]*H): P(holdout > forget) + 0.5 P(tie), by all pairs."""
    f, h = np.asarray(forget)[:, None], np.asarray(holdout)[None, :]
    return float(((h > f).sum() + 0.5 * (h == f).sum()) / (f.size * h.size))


# ------------------------------------------------------------------------------------------- tests


def test_em_es_match_torch(setup):
    tok, tm, _, _, lf, _, forget, _ = setup
    stats, _ = qa_token_stats(lf, tok, [r["question"] for r in forget], [r["answer"] for r in forget], "llama2",
                              MAX_LEN, batch_size=3)
    ours = memorization_scores(stats)
    ref = [torch_em_es(torch_row(tm, tok, r["question"], r["answer"])) for r in forget]
    np.testing.assert_allclose(ours["exact_memorization"], [e for e, _ in ref], **TOL)
    np.testing.assert_allclose(ours["extraction_strength"], [s for _, s in ref], **TOL)
    assert ours["exact_memorization"][0] > 0.3 and len(set(np.round(ours["exact_memorization"], 6))) >= 3
    assert len(set(np.round(ours["extraction_strength"], 6))) >= 3  # non-trivial values


def test_every_mia_score_auc_and_privleak_match_torch(setup):
    tok, tm, tref, jm, lf, ref_lf, forget, holdout = setup
    q = lambda rows: ([r["question"] for r in rows], [r["answer"] for r in rows])  # noqa: E731
    f_stats, f_enc = qa_token_stats(lf, tok, *q(forget), "llama2", MAX_LEN, batch_size=3)
    h_stats, h_enc = qa_token_stats(lf, tok, *q(holdout), "llama2", MAX_LEN, batch_size=3)
    ref_f = token_stats(ref_lf, f_enc["input_ids"], f_enc["attention_mask"], f_enc["labels"], 3)
    ref_h = token_stats(ref_lf, h_enc["input_ids"], h_enc["attention_mask"], h_enc["labels"], 3)
    res = run_mia((f_stats, f_enc), (h_stats, h_enc), tok, attacks=M.ATTACKS, ref_forget=ref_f, ref_holdout=ref_h,
                  gradnorm_fn=model_gradnorm_fn(jm, p=2), batch_size=3)
    ref_fs, ref_hs = torch_scores(tm, tref, tok, forget), torch_scores(tm, tref, tok, holdout)
    for attack in M.ATTACKS:
        np.testing.assert_allclose(res[attack]["forget"], ref_fs[attack], err_msg=attack, **TOL)
        np.testing.assert_allclose(res[attack]["holdout"], ref_hs[attack], err_msg=attack, **TOL)
        assert res[attack]["auc"] == pytest.approx(pairwise_auc(ref_fs[attack], ref_hs[attack]), abs=1e-12), attack
        assert np.ptp(ref_fs[attack]) > 1e-4, attack  # scores differ between rows
    # PrivLeak as MUSE: AUC' = 1 - AUC (holdout positive in open-unlearning), vs a "retain" model's AUC'
    ref_auc = pairwise_auc(torch_scores(tref, tm, tok, forget)["min_k"], torch_scores(tref, tm, tok, holdout)["min_k"])
    muse_u, muse_r = 1 - pairwise_auc(ref_fs["min_k"], ref_hs["min_k"]), 1 - ref_auc
    assert M.privleak(res["min_k"]["auc"], ref_auc) == pytest.approx((muse_u - muse_r) / muse_r * 100, abs=1e-5)
    assert M.privleak(0.5) == pytest.approx(0.0)


def test_truth_ratio_prob_mean_matches_torch(setup):
    tok, tm, _, _, lf, _, forget, _ = setup
    log = evaluate_split(forget, "eval_log_forget", logits_fn=lf, generate_fn=None, tokenizer=tok, fmt="llama2",
                         max_length=MAX_LEN, batch_size=3)
    pm = []
    for r in forget:
        para = torch_row(tm, tok, r["question"], r["paraphrased_answer"])["avg_loss"].item()
        pert = np.mean([torch_row(tm, tok, r["question"], a)["avg_loss"].item() for a in r["perturbed_answer"]])
        c, w = np.exp(-para), np.exp(-pert)
        pm.append(c / (c + w + 1e-10))
    assert truth_ratio_prob_mean(log) == pytest.approx(float(np.mean(pm)), abs=1e-5)
    # the legacy log's EM / ES are the forget-answer ones
    em = [torch_em_es(torch_row(tm, tok, r["question"], r["answer"]))[0] for r in forget]
    np.testing.assert_allclose([log["exact_memorization"][str(i)] for i in range(N)], em, **TOL)


def test_muse_verbmem_em_es_match_torch(setup):
    """MUSE verbmem EM / ES: open-unlearning's CompletionDataset (prefix + " " + text, no EOS)."""
    from alter_jax.data.muse import VerbMemItem
    from alter_jax.eval.muse import eval_verbmem_memorization

    tok, tm, _, _, lf, _, forget, holdout = setup
    items = [VerbMemItem(r["question"], r["answer"]) for r in forget + holdout]
    res = eval_verbmem_memorization(items, lf, tok, batch_size=3)
    ref = []
    for it in items:
        full = tok(it.prompt + " " + it.gt, add_special_tokens=True)["input_ids"]
        k = len(tok(it.prompt, add_special_tokens=True)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(tm(torch.tensor([full])).logits, -1)[0, :-1]
        labels = torch.tensor([-100] * k + full[k:])
        ref.append(torch_em_es({"vlp": lp[k - 1:len(full) - 2], "tgt": labels[k:len(full) - 1]}))
    np.testing.assert_allclose([p["exact_memorization"] for p in res["per_item"]], [e for e, _ in ref], **TOL)
    np.testing.assert_allclose([p["extraction_strength"] for p in res["per_item"]], [s for _, s in ref], **TOL)
    assert res["exact_memorization"] == pytest.approx(np.mean([e for e, _ in ref]), abs=1e-5)
    assert res["n"] == len(items) and len(set(np.round([e for e, _ in ref], 6))) >= 3
