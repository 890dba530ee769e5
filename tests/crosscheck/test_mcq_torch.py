"""MCQ cross-check: our JAX scorer vs an independent PyTorch log-likelihood scorer.

A tiny random Llama (transformers, torch) and a tiny BPE tokenizer are saved to a temp
folder. Our side loads the folder with ``alter_jax.io.hf.load_pretrained`` and scores 12
synthetic questions (2 subjects) through ``evaluate_mcq``; the reference side scores
every (question, option) one sequence at a time, unpadded, with ``LlamaForCausalLM``.
Chosen letters, per-subject and overall accuracies must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alter_jax.data.mcq import MCQItem
from alter_jax.eval.mcq import evaluate_mcq

DESC = "The following are multiple choice questions (with answers) about {}.\n\n"
WORDS = ["cell", "virus", "gene", "port", "key", "hash", "lab", "code", "root", "node", "acid", "file"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [DESC.format("biology"), DESC.format("computer security"), " ".join(WORDS),
              "Which is it?\nA. x\nB. y\nC. z\nD. w\nAnswer:", " A B C D" * 10] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(path, vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger random weights so that the four letters are well separated
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def synthetic_items():
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        subject = "college_biology" if i < 6 else "computer_security"
        choices = tuple(str(w) for w in rng.choice(WORDS, size=4, replace=False))
        items.append(MCQItem(f"Which {WORDS[i]} is it? ", choices, int(rng.integers(4)), subject))
    return items


def torch_loglik(model, tok, item, add_special_tokens):
    """Independent reference: one unpadded sequence per option."""
    topic = item.subject.replace("_", " ")
    context = (DESC.format(topic) + item.question.strip() + "\n"
               + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", item.choices)) + "Answer:")
    out = []
    for letter in "ABCD":
        ctx = tok(context, add_special_tokens=add_special_tokens)["input_ids"]
        whole = tok(context + " " + letter, add_special_tokens=add_special_tokens)["input_ids"]
        cont = whole[len(ctx):]
        inp = torch.tensor([ctx + cont[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].double(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        out.append(float(logp[pos, torch.tensor(cont)].sum()))
    return np.array(out)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_mcq_letters_and_accuracies_match_torch(tmp_path, add_special_tokens):
    import jax.numpy as jnp
    from flax import nnx

    from alter_jax.io.hf import load_pretrained

    tok = tiny_tokenizer()
    ref_model = tiny_llama(tmp_path / "m", len(tok))
    items = synthetic_items()

    ref_ll = np.stack([torch_loglik(ref_model, tok, it, add_special_tokens) for it in items])
    ref_pred = ref_ll.argmax(-1)
    # the reference argmax must be unambiguous for the comparison to mean something
    top2 = np.sort(ref_ll, -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)

    model = load_pretrained(tmp_path / "m", dtype="float32")
    fwd = nnx.jit(lambda m, ids, mask: m(ids, mask))

    def logits_fn(ids, mask):
        return np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(mask)))

    res = evaluate_mcq(items, logits_fn, tok, batch_size=5, add_special_tokens=add_special_tokens, progress=False)

    np.testing.assert_allclose(res.loglik, ref_ll, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(res.predictions, ref_pred)
    assert len(set(ref_pred.tolist())) > 1  # not a constant letter
    answers = np.array([it.answer for it in items])
    assert res.accuracy == pytest.approx(float(np.mean(ref_pred == answers)))
    for subj, sl in (("college_biology", slice(0, 6)), ("computer_security", slice(6, 12))):
        assert res.per_subject[subj] == pytest.approx(float(np.mean(ref_pred[sl] == answers[sl])))
        assert res.counts[subj] == 6
