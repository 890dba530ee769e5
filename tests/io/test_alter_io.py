"""ALTER adapter checkpoints: exact round trip (parameters and routed logits) and clear errors.

Also the PEFT loader's refusals (no torch needed: the folders are written by save_peft_adapter).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.adapters.inject import adapted_layers, add_adapters, adapter_state
from alter_jax.adapters.lora import GROUPS, AdapterConfig, GatedRouting, HardRouting
from alter_jax.io.alter import AdapterCheckpointError, load_alter_adapter, save_alter_adapter
from alter_jax.io.hf import load_pretrained
from alter_jax.io.peft import load_peft_adapter, save_peft_adapter
from tests.helpers import make_tiny_hf_model

N = 3
CFG = AdapterConfig(rank=4, alpha=8.0, num_forget_experts=N, top_k=2, tau_high=0.8, tau_low=0.01)
EXTRA = {"q": 1.5, "threshold": {"kind": "quantile", "value": np.float32(0.75)}, "domains": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("base"), "llama_gqa")


def randomise(model, seed):
    """Random non-zero values in every group of every adapted layer."""
    key = jax.random.key(seed)
    for lin in adapted_layers(model).values():
        for group in GROUPS:
            var = getattr(lin.adapter, group)
            if var is not None:
                key, sub = jax.random.split(key)
                var[...] = 0.2 * jax.random.normal(sub, var[...].shape) + 0.01
    return model


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    model = randomise(add_adapters(load_pretrained(base), CFG, seed=0), seed=1)
    out = save_alter_adapter(model, tmp_path_factory.mktemp("alter") / "adapter", extra=EXTRA)
    return model, out


def flat(model):
    return {k: np.asarray(v[...]) for k, v in adapter_state(model).flat_state()}


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, (3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = np.where(mask == 1, ids, 0)
    entropy = jnp.asarray(rng.uniform(0.0, 2.0, ids.shape), jnp.float32)
    return ids, mask, entropy


def test_round_trip_parameters_and_logits(base, saved):
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["alter_adapter.safetensors", "alter_config.json"]
    loaded, extra = load_alter_adapter(load_pretrained(base), out)
    assert extra == {"q": 1.5, "threshold": {"kind": "quantile", "value": 0.75}, "domains": ["a", "b", "c"]}
    a, b = flat(model), flat(loaded)
    assert a.keys() == b.keys() and len(a) == 14 * 4  # 2 layers x 7 projections x 4 groups
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert np.count_nonzero(a[k]) == a[k].size  # every group random and non-zero
    cfgs = {lin.adapter.cfg for lin in adapted_layers(loaded).values()}
    assert cfgs == {CFG}

    ids, mask, entropy = inputs()
    hard = HardRouting(expert=jnp.asarray([0, 3, 1], jnp.int32))
    gated = GatedRouting(entropy=entropy, high=entropy > 1.0)
    for ctx in (None, hard, gated):
        ref = np.asarray(model(ids, mask, adapter_ctx=ctx))
        got = np.asarray(loaded(ids, mask, adapter_ctx=ctx))
        np.testing.assert_array_equal(ref, got)
    # the routes really differ (the test would be vacuous otherwise)
    assert np.abs(np.asarray(model(ids, mask, adapter_ctx=hard)) - np.asarray(model(ids, mask))).max() > 1e-3
    assert np.abs(np.asarray(model(ids, mask, adapter_ctx=gated)) - np.asarray(model(ids, mask))).max() > 1e-3



def test_load_runs_no_initialisation(base, saved):
    """Loading fills shape-only adapters (issue 14: an export took 10 s, most of it compiling the
    random initialisers of adapters that the load overwrites at once): no XLA compilation runs
    inside ``load_alter_adapter``, and no variable is left abstract."""
    _, out = saved
    backbone = load_pretrained(base)
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        loaded, _ = load_alter_adapter(backbone, out)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    leaves = jax.tree_util.tree_leaves(adapter_state(loaded))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)

def test_config_file_contents(saved):
    _, out = saved
    cfg = json.loads((out / "alter_config.json").read_text())
    assert cfg["format"] == "alter-adapter" and cfg["format_version"] == 1
    assert cfg["adapter_config"]["num_forget_experts"] == N and cfg["adapter_config"]["rank"] == 4
    assert cfg["layers"][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert cfg["layers"][-1] == "model.layers.1.mlp.down_proj" and len(set(cfg["layers"])) == 14
    from safetensors.numpy import load_file

    t = load_file(str(out / "alter_adapter.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.shared_a"].shape == (4, 64)
    assert t["model.layers.0.self_attn.q_proj.forget_experts"].shape == (N, 64, 4)
    assert t["model.layers.1.mlp.down_proj.router"].shape == (96 + 1, N + 1)


# ----------------------------------------------------------------------------- ALTER errors
def copy(out, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(out, d)
    return d


def edit_config(d, fn):
    f = d / "alter_config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def assert_refused(base, d, match):
    model = load_pretrained(base) if not hasattr(base, "cfg") else base
    with pytest.raises(AdapterCheckpointError, match=match):
        load_alter_adapter(model, d)
    assert not adapted_layers(model)  # a failed load leaves the model untouched


def test_missing_folder_and_files(base, saved, tmp_path):
    _, out = saved
    assert_refused(base, tmp_path / "nope", "no such adapter folder")
    d = copy(out, tmp_path)
    (d / "alter_adapter.safetensors").unlink()
    assert_refused(base, d, r"alter_adapter\.safetensors: missing")
    (d / "alter_config.json").unlink()
    assert_refused(base, d, r"alter_config\.json: missing")


def test_corrupt_files(base, saved, tmp_path):
    _, out = saved
    d = copy(out, tmp_path)
    w = d / "alter_adapter.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_refused(base, d, r"alter_adapter\.safetensors: cannot read safetensors file.*corrupt or truncated")
    (d / "alter_config.json").write_text("{not json")
    assert_refused(base, d, r"alter_config\.json: not valid JSON")


def test_unknown_format_version(base, saved, tmp_path):
    d = copy(saved[1], tmp_path)
    edit_config(d, lambda c: c.update(format_version=99))
    assert_refused(base, d, r"format_version 99 is not known.*Upgrade alter-jax")


def test_unknown_config_field(base, saved, tmp_path):
    d = copy(saved[1], tmp_path)
    edit_config(d, lambda c: c["adapter_config"].update(new_knob=1))
    assert_refused(base, d, r"unknown field\(s\) \['new_knob'\]")


def test_expert_count_differs_from_config(base, saved, tmp_path):
    d = copy(saved[1], tmp_path)
    edit_config(d, lambda c: c["adapter_config"].update(num_forget_experts=2))
    assert_refused(base, d, r"holds 3 forget expert\(s\) but .*alter_config\.json says num_forget_experts=2")
    edit_config(d, lambda c: c["adapter_config"].update(num_forget_experts=0))
    assert_refused(base, d, r"holds 3 forget expert\(s\) but .*num_forget_experts=0")


def test_layer_and_shape_mismatch(saved, tmp_path):
    _, out = saved
    one_layer = make_tiny_hf_model(tmp_path / "one", "llama_gqa", num_hidden_layers=1)
    assert_refused(one_layer, out, r"layer\(s\) \['model\.layers\.1\.self_attn\.q_proj'.*do not exist in this model \(1 layers\)")
    narrow = make_tiny_hf_model(tmp_path / "narrow", "llama_gqa", hidden_size=32)
    assert_refused(narrow, out, r"tensor 'model\.layers\.0\.self_attn\.q_proj\.shared_a' has shape \(4, 64\).*imply \(4, 32\)")


def test_refuses_model_with_adapters(base, saved):
    model = add_adapters(load_pretrained(base), CFG)
    with pytest.raises(AdapterCheckpointError, match="already carries adapters"):
        load_alter_adapter(model, saved[1])


def test_save_errors(base, tmp_path):
    with pytest.raises(ValueError, match="carries no adapters"):
        save_alter_adapter(load_pretrained(base), tmp_path / "x")
    model = add_adapters(load_pretrained(base), CFG)
    with pytest.raises(TypeError, match="extra is not JSON serialisable"):
        save_alter_adapter(model, tmp_path / "x", extra={"f": object()})
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- PEFT refusals
@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    model = randomise(add_adapters(load_pretrained(base), AdapterConfig(rank=4, alpha=8.0, num_forget_experts=N)), seed=2)
    out = save_peft_adapter(model, tmp_path_factory.mktemp("peft") / "adapter", expert=2)
    return model, out


def test_peft_round_trip_is_expert(base, peft_dir):
    model, out = peft_dir
    lora = load_peft_adapter(load_pretrained(base), out)
    cfg = next(iter(adapted_layers(lora).values())).adapter.cfg
    assert (cfg.num_forget_experts, cfg.use_router, cfg.rank, cfg.alpha) == (0, False, 4, 8.0)
    ids, mask, _ = inputs(1)
    ref = model(ids, mask, adapter_ctx=HardRouting(expert=jnp.full((3,), 2, jnp.int32)))
    np.testing.assert_allclose(np.asarray(lora(ids, mask)), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("use_dora", True, r"field 'use_dora' = True is not supported.*magnitude"),
        ("bias", "all", r"field 'bias' = 'all' is not supported.*bias='none'"),
        ("modules_to_save", ["lm_head"], r"field 'modules_to_save'.*merge_and_unload"),
        ("layers_to_transform", [0], r"field 'layers_to_transform' = \[0\]"),
        ("rank_pattern", {"q_proj": 8}, r"field 'rank_pattern'.*per-layer ranks"),
        ("alpha_pattern", {"q_proj": 8}, r"field 'alpha_pattern'.*per-layer alphas"),
        ("fan_in_fan_out", True, r"field 'fan_in_fan_out'"),
        ("init_lora_weights", "pissa", r"field 'init_lora_weights' = 'pissa'.*changes the base weights"),
        ("peft_type", "IA3", r"field 'peft_type' = 'IA3'.*only LoRA"),
    ],
)
def test_peft_unsupported_options(base, peft_dir, tmp_path, field, value, match):
    d = tmp_path / "p"
    shutil.copytree(peft_dir[1], d)
    f = d / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), field: value}))
    model = load_pretrained(base)
    with pytest.raises(AdapterCheckpointError, match=r"adapter_config\.json: " + match):
        load_peft_adapter(model, d)
    assert not adapted_layers(model)


def test_peft_bad_tensors(base, peft_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "p"
    shutil.copytree(peft_dir[1], d)
    w = d / "adapter_model.safetensors"
    t = load_file(str(w))
    save_file({**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(64, np.float32)}, str(w))
    with pytest.raises(AdapterCheckpointError, match=r"lora_magnitude_vector' is not a LoRA A/B weight"):
        load_peft_adapter(load_pretrained(base), d)
    save_file({k: v for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" not in k}, str(w))
    with pytest.raises(AdapterCheckpointError, match=r"layers\.1\.mlp\.up_proj has lora_A but not both"):
        load_peft_adapter(load_pretrained(base), d)
    f = d / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "r": 8}))
    save_file(t, str(w))
    with pytest.raises(AdapterCheckpointError, match=r"lora_A\.weight has shape \(4, \d+\), this model and r=8 in .*adapter_config\.json imply \(8, \d+\)"):
        load_peft_adapter(load_pretrained(base), d)


def test_peft_regex_target_modules(base, peft_dir, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(peft_dir[1], d)
    f = d / "adapter_config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, "target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"}))
    lora = load_peft_adapter(load_pretrained(base), d)
    assert len(adapted_layers(lora)) == 14
    f.write_text(json.dumps({**cfg, "target_modules": r".*\.(q_proj|v_proj)"}))
    with pytest.raises(AdapterCheckpointError, match=r"layer model\.layers\.\d\.\w+\.\w+_proj is not selected by .*'target_modules'"):
        load_peft_adapter(load_pretrained(base), d)
