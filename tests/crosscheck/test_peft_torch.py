"""PEFT LoRA import/export against PyTorch ``peft``: logits of both directions and of the merged model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from alter_jax.adapters.inject import adapted_layers, add_adapters, merged_backbone  # noqa: E402
from alter_jax.adapters.lora import AdapterConfig, HardRouting  # noqa: E402
from alter_jax.io.hf import load_pretrained, save_pretrained  # noqa: E402
from alter_jax.io.peft import load_peft_adapter, save_peft_adapter  # noqa: E402
from alter_jax.models.llama import TARGET_MODULES  # noqa: E402
from tests.helpers import make_tiny_hf_model  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("base"), "llama_gqa")


@pytest.fixture(scope="module")
def torch_lora(base, tmp_path_factory):
    """A PEFT LoRA (r=4, alpha=8, all 7 projections) with random B, saved to disk."""
    torch.manual_seed(1)
    tm = AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES), lora_dropout=0.0))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # PEFT inits B to zero: randomise so the adapter does something
                p.copy_(torch.randn_like(p) * 0.1)
    pm.eval()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    pm.save_pretrained(out, safe_serialization=True)
    return out, pm


def batch(seed=0, lengths=(12, 8, 3), total=12):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, total - n:] = rng.integers(3, 128, n)
        mask[i, total - n:] = 1
    return ids, mask


def torch_logits(tm, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def max_err(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask == 1].max())


def test_peft_adapter_loads_with_peft_logits(base, torch_lora):
    folder, pm = torch_lora
    jm = load_peft_adapter(load_pretrained(base), folder)
    layers = adapted_layers(jm)
    assert len(layers) == 7 * 2
    cfg = next(iter(layers.values())).adapter.cfg
    assert (cfg.rank, cfg.scale, cfg.num_forget_experts, cfg.use_router) == (4, 2.0, 0, False)
    assert cfg.target_modules == TARGET_MODULES
    ids, mask = batch()
    ref = torch_logits(pm, ids, mask)
    got = np.asarray(jm(ids, mask))
    assert max_err(ref, got, mask) < TOL
    # the adapter really changes the output (B was randomised)
    assert max_err(ref, np.asarray(load_pretrained(base)(ids, mask)), mask) > 1e-2


def test_rslora_scale(base, torch_lora, tmp_path):
    folder, _ = torch_lora
    rs = tmp_path / "rs"
    rs.mkdir()
    (rs / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    tm = AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.PeftModel.from_pretrained(tm, rs).eval()
    jm = load_peft_adapter(load_pretrained(base), rs)
    assert next(iter(adapted_layers(jm).values())).adapter.cfg.scale == pytest.approx(8 / 2.0)  # alpha / sqrt(r)
    ids, mask = batch(seed=3)
    assert max_err(torch_logits(pm, ids, mask), jm(ids, mask), mask) < TOL


def random_alter(base, n_forget=2, targets=TARGET_MODULES, seed=0):
    """Our model with an ALTER adapter whose every group is random and non-zero."""
    jm = add_adapters(load_pretrained(base), AdapterConfig(rank=4, alpha=8.0, target_modules=targets, num_forget_experts=n_forget), seed=seed)
    key = jax.random.key(seed + 7)
    for lin in adapted_layers(jm).values():
        ad = lin.adapter
        key, k1, k2 = jax.random.split(key, 3)
        ad.retain_expert[...] = 0.1 * jax.random.normal(k1, ad.retain_expert[...].shape)
        if ad.forget_experts is not None:
            ad.forget_experts[...] = 0.1 * jax.random.normal(k2, ad.forget_experts[...].shape)
    return jm


@pytest.mark.parametrize("expert", [0, 2])
def test_export_loads_in_peft(base, tmp_path, expert):
    jm = random_alter(base)
    out = save_peft_adapter(jm, tmp_path / "export", expert=expert, base_model_name_or_path=str(base))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (4, 8, sorted(TARGET_MODULES))
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    ids, mask = batch(seed=1)
    ref = torch_logits(pm, ids, mask)
    got = jm(ids, mask, adapter_ctx=HardRouting(expert=jnp.full((ids.shape[0],), expert, jnp.int32)))
    assert max_err(ref, got, mask) < TOL
    # and back into JAX as a plain LoRA
    back = load_peft_adapter(load_pretrained(base), out)
    assert max_err(back(ids, mask), got, mask) < TOL


def test_export_of_partial_targets_uses_full_names(base, tmp_path):
    jm = random_alter(base, n_forget=0, targets=("layers.1.mlp.down_proj", "q_proj"))
    out = save_peft_adapter(jm, tmp_path / "partial")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                             "model.layers.1.self_attn.q_proj"]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    ids, mask = batch(seed=4)
    assert max_err(torch_logits(pm, ids, mask), jm(ids, mask), mask) < TOL


def test_merged_backbone_matches_peft_merge_and_unload(base, torch_lora, tmp_path):
    folder, _ = torch_lora
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).merge_and_unload().eval()
    jm = load_peft_adapter(load_pretrained(base), folder)
    out = save_pretrained(merged_backbone(jm), tmp_path / "merged")
    tm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch(seed=2)
    assert max_err(torch_logits(merged, ids, mask), torch_logits(tm, ids, mask), mask) < TOL
