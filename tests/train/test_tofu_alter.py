"""A short ALTER run on real TOFU data (forget01 + a slice of retain90) with a tiny Llama.

The tiny Llama first learns the 40 forget and 40 retain answers (so there is something
to forget), then ALTER runs for a few epochs with a fixed seed: the forget-set answer
probability falls and the retain-set one stays within 5 % of where it started.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from alter_jax import config as C
from alter_jax.data.synthetic import train_toy_tokenizer
from alter_jax.data.tofu import load_tofu_split
from alter_jax.io.hf import save_pretrained
from alter_jax.models.config import ModelConfig
from alter_jax.models.llama import Transformer
from alter_jax.train.finetune import finetune
from alter_jax.train.loop import unlearn
from alter_jax.train.prepare import encode


def test_short_alter_run_on_tofu_forget01(tofu_dir, tmp_path):
    forget = load_tofu_split("forget01", tofu_dir)
    retain = load_tofu_split("retain90", tofu_dir)[:40]
    rows = forget + retain
    tok = train_toy_tokenizer([r["question"] + " " + r["answer"] for r in rows], "llama2", 1024)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                      pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    finetune(model, encode(tok, rows, "llama2", 160), epochs=25, lr=2e-3, batch_size=8, progress=False)
    save_pretrained(model, tmp_path / "model", tokenizer=tok)

    run = C.RunConfig(
        model=C.ModelSpec(name=str(tmp_path / "model"), prompt_format="llama2", max_length=160),
        entropy=C.EntropyConfig(threshold="quantile", value=0.3),
        data=C.DataConfig(source=str(tofu_dir), forget_split="forget01", retain_split="retain90", num_retain=40,
                          num_subdomains=2),
        train=C.TrainConfig(method="alter", epochs=3, batch_size=4, seed=0, checkpoint_every=100),
        eval=C.EvalConfig(batch_size=8, max_new_tokens=8, num_questions=40),
        output_dir=str(tmp_path / "run"),
    )
    report = unlearn(run, progress=False, log=lambda *_: None)
    b, a = report["before"], report["after"]
    assert b["forget"]["answer_prob"] > 0.5, b  # learned
    assert a["forget"]["answer_prob"] < 0.5 * b["forget"]["answer_prob"], (b, a)
    assert abs(a["retain"]["answer_prob"] - b["retain"]["answer_prob"]) <= 0.05 * b["retain"]["answer_prob"], (b, a)
    assert report["data"]["num_forget_experts"] == 2
