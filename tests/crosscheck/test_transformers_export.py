"""The transformers export of ALTER's gated model (issue 18) against our JAX gated forward.

``bin/export --format transformers`` / :func:`alter_jax.io.transformers_export.save_transformers_alter`
write a folder that ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` runs
with transformers' own Llama / Mistral and ``modeling_alter.py`` (torch + transformers only).
Checked on tiny random Llama and Mistral models with random non-zero experts and routers (so
that the gate matters): logits within 1e-4 (float32, left padding, Mistral's sliding window),
greedy generation of 32 tokens token-identical (batched, left padding) with both high- and
low-entropy generated tokens; and on a finished demo run the run's own forget / retain answer
probabilities recomputed through transformers within 1e-3.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from alter_jax import gated as G  # noqa: E402
from alter_jax.adapters.inject import add_adapters  # noqa: E402
from alter_jax.adapters.lora import AdapterConfig, HardRouting  # noqa: E402
from alter_jax.io.hf import load_pretrained  # noqa: E402
from alter_jax.io.transformers_export import save_transformers_alter  # noqa: E402
from alter_jax.models.llama import linear_layers  # noqa: E402
from tests.crosscheck.test_backbone_torch import left_padded_batch  # noqa: E402
from tests.helpers import make_tiny_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def random_alter(folder: Path, seed: int = 0):
    """Our model of ``folder`` with ALTER adapters: 3 forget experts, top-2 of 4, random B and router."""
    model = load_pretrained(folder)
    add_adapters(model, AdapterConfig(rank=4, alpha=8.0, num_forget_experts=3, top_k=2), seed=seed + 1)
    rng = np.random.default_rng(seed)
    for lin in linear_layers(model).values():
        ad = lin.adapter
        ad.retain_expert[...] = rng.normal(0, 0.3, ad.retain_expert.shape).astype(np.float32)
        ad.forget_experts[...] = rng.normal(0, 0.3, ad.forget_experts.shape).astype(np.float32)
        ad.router[...] = rng.normal(0, 0.3, ad.router.shape).astype(np.float32)
    return model


def median_theta(model, ids, mask) -> float:
    """θ between the median backbone entropies of the real tokens: both kinds occur, none sits on θ."""
    _, s = G.gated_logits(model, ids, mask, G.GateConfig(q=1.0, threshold=0.0), return_entropy=True)
    v = np.sort(np.asarray(s)[(mask > 0) & (np.asarray(s) > 0)])
    return float(0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2]))


def hf_logits(hf, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)  # our positions skip left padding (HF generate's convention)
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


@pytest.fixture(scope="module", params=["llama_gqa", "mistral_window"])
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    base = make_tiny_hf_model(d / "base", request.param)
    model = random_alter(base)
    ids, mask = left_padded_batch([16, 11, 4], 16)  # 16 > Mistral's sliding window 6
    theta = median_theta(model, ids, mask)
    out = save_transformers_alter(model, d / "export", q=1.0, threshold=theta)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    return dict(base=base, model=model, theta=theta, out=out, hf=hf, kind=request.param)


def test_folder_is_a_transformers_model_with_remote_code(exported):
    out, hf = exported["out"], exported["hf"]
    cfg = json.loads((out / "config.json").read_text())
    model_type = "mistral" if exported["kind"].startswith("mistral") else "llama"
    assert cfg["model_type"] == f"alter_{model_type}" and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    a = cfg["alter"]
    assert (a["num_forget_experts"], a["top_k"], a["q"], a["threshold"]) == (3, 2, 1.0, exported["theta"])
    assert a["retain_bias"] == 2.0 and a["tau_high"] == 0.8 and a["tau_low"] == 0.01 and a["entropy_source"] == "base"
    assert a["prompt_entropy"] == "base"
    assert len(a["layers"]) == 14  # 7 projections x 2 layers
    base_cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    assert base_cls in [c.__name__ for c in type(hf).__mro__]  # transformers' own model underneath
    src = (out / "modeling_alter.py").read_text()
    imports = {l.split()[1].split(".")[0] for l in src.splitlines() if l.startswith(("import ", "from "))}
    assert imports <= {"__future__", "inspect", "torch", "transformers", ""}, imports  # "" = the relative import
    # the backbone tensors keep their plain names: a plain model reads them (and would ignore the adapter)
    plain = AutoModelForCausalLM.from_pretrained(str(exported["base"])).state_dict()
    sd = hf.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.items() if k in sd) and set(plain) <= set(sd)
    with pytest.raises(Exception, match="trust_remote_code"):  # never silently the (not unlearned) backbone
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)


def test_logits_match_our_gated_forward(exported):
    model, hf, theta = exported["model"], exported["hf"], exported["theta"]
    ids, mask = left_padded_batch([16, 11, 4], 16)
    gate = G.GateConfig(q=1.0, threshold=theta)
    ref, s = G.gated_logits(model, ids, mask, gate, return_entropy=True)
    ref, s = np.asarray(ref), np.asarray(s)
    got = hf_logits(hf, ids, mask)
    assert got.dtype == np.float32
    err = np.abs(got - ref)[mask == 1].max()
    assert err < 1e-4, err
    real = (mask == 1) & (s > 0)
    assert (s[real] > theta).any() and (s[real] <= theta).any()  # both branches of Eq. 9 ran
    expert0 = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter_ctx=HardRouting(jnp.zeros(3, jnp.int32))))
    assert np.abs(expert0 - ref)[mask == 1].max() > 0.1  # the gate matters: not the retain expert alone


def test_self_entropy_source_matches(exported, tmp_path):
    model, theta = exported["model"], exported["theta"]
    ids, mask = left_padded_batch([12, 7], 12, seed=4)
    out = save_transformers_alter(model, tmp_path / "self", q=1.0, threshold=theta, entropy_source="self", self_iters=2)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    ref = np.asarray(G.gated_logits(model, ids, mask, G.GateConfig(q=1.0, threshold=theta, source="self", self_iters=2)))
    base = np.asarray(G.gated_logits(model, ids, mask, G.GateConfig(q=1.0, threshold=theta)))
    got = hf_logits(hf, ids, mask)
    # Judged against transformers in float64 (the exact answer), not float32 against float32: the
    # low-entropy temperature tau_low = 0.01 multiplies router-logit rounding by 100, so at a few
    # positions both float32 forwards drift ~1e-4 from the exact logits (transformers' own by
    # 3e-5, ours by 8e-5 on llama_gqa) and their difference is the sum of two rounding errors.
    hf64 = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float64).eval()
    exact = hf_logits(hf64, ids, mask)
    real = mask == 1
    assert np.abs(ref - exact)[real].max() < 1.5e-4  # ours: float32 rounding of the exact value
    assert np.abs(got - exact)[real].max() < 1.5e-4  # the export, run in float32
    assert np.median(np.abs(got - ref)[real]) < 1e-6  # away from the amplified positions: bitwise-close
    assert np.abs(base - ref)[real].max() > 1e-3  # the source changes the numbers


def test_greedy_generation_is_token_identical(exported):
    model, hf, theta = exported["model"], exported["hf"], exported["theta"]
    ids, mask = left_padded_batch([9, 5, 3], 9, seed=1)
    ours = np.asarray(G.gated_generate(model, ids, mask, G.GateConfig(q=1.0, threshold=theta), 32).tokens)
    with torch.no_grad():
        res = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, do_sample=False,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got = res.sequences[:, ids.shape[1]:].numpy()
    assert got.shape[1] == 32  # no row hit EOS: all 32 steps compared
    np.testing.assert_array_equal(got, ours)
    # generated tokens take the entropy of the distribution they were drawn from: both kinds occur
    logits = torch.stack(res.logits, 1)[:, :-1]  # the distributions behind tokens 2..32
    p = torch.softmax(logits.float(), -1)
    s = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    assert (s > theta).any() and (s <= theta).any()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(exported["base"])).eval().generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert (plain[:, ids.shape[1]:].numpy() != got).any()  # the gated model is not the backbone


def test_prompt_entropy_zero_generation_matches(exported, tmp_path):
    """The measured departure (GateConfig.prompt_entropy="zero": no backbone prefill) in both implementations."""
    model, theta = exported["model"], exported["theta"]
    ids, mask = left_padded_batch([9, 5, 3], 9, seed=1)
    out = save_transformers_alter(model, tmp_path / "zero", q=1.0, threshold=theta, prompt_entropy="zero")
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    gate = G.GateConfig(q=1.0, threshold=theta, prompt_entropy="zero")
    ours = np.asarray(G.gated_generate(model, ids, mask, gate, 32).tokens)
    with torch.no_grad():
        got = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, do_sample=False,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(got, ours)
    base = np.asarray(G.gated_generate(model, ids, mask, G.GateConfig(q=1.0, threshold=theta), 32).tokens)
    assert (base != ours).any()  # the prompt's entropies change what is generated on this random model
    np.testing.assert_allclose(hf_logits(hf, ids, mask), hf_logits(exported["hf"], ids, mask), atol=1e-6)  # scoring: spec


# ----------------------------------------------------------------------------- the demo run
@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """A short ALTER run on the demo world (12 steps) and its transformers export via bin/export."""
    from alter_jax.cli import export as export_cli
    from alter_jax.train.loop import unlearn
    from tests.train.test_loop import demo_run

    d = tmp_path_factory.mktemp("demo")
    run = demo_run(d / "run", train={"max_steps": 12, "epochs": 1},
                   eval={"num_questions": 16, "max_new_tokens": 2, "batch_size": 8})
    report = unlearn(run, progress=False, log=lambda *_: None)
    out = d / "hf"
    assert export_cli.main(["--run", str(d / "run"), "--format", "transformers", "--out", str(out)]) == 0
    return d / "run", out, report


def test_demo_run_probabilities_through_transformers(demo_export):
    from alter_jax.cli import export as export_cli
    from alter_jax.train.loop import answer_probability

    run_dir, out, report = demo_export
    run = export_cli.read_run(run_dir)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    arrays = export_cli.eval_arrays(run, run_dir, tok)

    def logits_fn(ids, mask):
        with torch.no_grad():
            return hf(torch.tensor(np.asarray(ids, np.int64)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()

    for side in ("forget", "retain"):
        got = float(np.mean(answer_probability(logits_fn, arrays[side], run.eval.batch_size, run.model.length_bucket)))
        want = report["after"][side]["answer_prob"]
        assert abs(got - want) < 1e-3, (side, got, want)
    assert report["after"]["forget"]["answer_prob"] < report["before"]["forget"]["answer_prob"] - 0.05  # it unlearned
    card = (out / "README.md").read_text()
    assert "What was unlearned" in card and f"`{run.data.forget_split}`" in card and "trust_remote_code=True" in card
    assert f"{report['after']['forget']['answer_prob']:.4f}" in card and f"{report['after']['retain']['answer_prob']:.4f}" in card


def test_demo_export_runs_in_a_pipeline_without_alter_jax(demo_export, tmp_path):
    """generate() through transformers' pipeline (a prompt, then chat messages through a chat template) in a
    fresh process where alter_jax cannot be imported."""
    _, out, _ = demo_export
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('alter_jax', 'jax', 'flax'): raise ImportError('blocked: ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('text-generation', model={str(out)!r}, trust_remote_code=True)\n"
        "res = pipe('[INST] Where was the author born? [/INST]', max_new_tokens=8, do_sample=False)\n"
        "assert isinstance(res[0]['generated_text'], str)\n"
        "pipe.tokenizer.chat_template = \"{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}\"\n"
        "chat = pipe([{'role': 'user', 'content': 'Where was the author born?'}], max_new_tokens=8, do_sample=False)\n"
        "print('OK', repr(chat[0]['generated_text'][-1]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_export_prompt_entropy_flag_reaches_config_and_card(demo_export, tmp_path):
    from alter_jax.cli import export as export_cli

    run_dir, _, _ = demo_export
    out = tmp_path / "zero"
    assert export_cli.main(["--run", str(run_dir), "--format", "transformers", "--prompt-entropy", "zero",
                            "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["alter"]["prompt_entropy"] == "zero"
    assert "written with `prompt_entropy=zero`" in (out / "README.md").read_text()
