"""``bin/export``: turn a finished unlearning run into a deployable artefact.

    bin/export --run runs/demo --format alter  --out exports/demo_alter    # the whole ALTER adapter
    bin/export --run runs/demo --format peft   --out exports/demo_peft     # a PEFT LoRA (one expert)
    bin/export --run runs/demo --format merged --expert 0 --out exports/demo_merged
    bin/export --run runs/demo --format transformers --out exports/demo_hf  # the gated model for PyTorch

Formats (``RUN_DIR`` holds ``config.json`` and ``adapter/`` or ``model/``):

* ``alter``  — every expert, the router and the entropy settings (``alter_jax.io.alter``),
  validated by loading it into the run's backbone, then copied. Only alter-jax can run the
  entropy-gated forward (Eq. 9) it needs.
* ``transformers`` — ALTER / AsymLoRA runs: the entropy-gated model (Eq. 9) as a Hugging Face
  folder that ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads:
  transformers' own Llama / Mistral with every adapted linear gated by ``modeling_alter.py``
  (torch + transformers only), the backbone weights, every expert, the router and the entropy
  settings (``alter_jax.io.transformers_export``), the tokenizer and a model card (README.md)
  with the run's figures and what was unlearned. ``generate()``, pipelines and chat templates work.
* ``peft``   — the plain LoRA ``(A, B_expert)`` in PEFT's format
  (``PeftModel.from_pretrained(base, OUT)``); for plain-LoRA methods the one expert, for
  ALTER / AsymLoRA the chosen expert (0 = retain expert, 1..N = forget experts) under hard
  routing.
* ``merged`` — a Hugging Face model folder with ``W0 + s·B_expert A`` folded into every
  kernel (``adapters.inject.merged_backbone``) and the base tokenizer; transformers loads it
  as a plain ``LlamaForCausalLM`` / ``MistralForCausalLM``. A full-parameter run's
  ``model/`` is re-saved as is.

WARNING: a single expert under hard routing is not ALTER's gated inference. ``merged`` /
``peft`` of expert 0 is the retain expert, which has NOT forgotten the forget set; a forget
expert forgets but damages retain answers. Neither is what the run measured; each such
export prints this, with the chosen expert's forget / retain answer probability measured on
the run's evaluation rows beside the gated model's (``--no-measure`` skips the measurement),
and writes it into the export's README.md. Only the gated formats ``transformers`` and
``alter`` (with alter-jax's gated forward) reproduce the run's figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from alter_jax.cli.common import CliError

FORMATS = ("alter", "transformers", "peft", "merged")
GATED_FORMATS = ("alter", "transformers")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (the output_dir of bin/unlearn)")
    p.add_argument("--format", required=True, choices=FORMATS, help="alter | transformers | peft | merged (see above)")
    p.add_argument("--expert", type=int, default=0, help="expert for peft / merged: 0 = retain expert, 1..N forget experts "
                   "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="merged / transformers: backbone weight dtype of the saved model (default: the run's "
                   "parameter dtype)")
    p.add_argument("--prompt-entropy", default="base", choices=("base", "zero"),
                   help="transformers: where generate()'s prompt tokens get their entropy: base = one backbone forward "
                   "(the spec, default), zero = none, S = 0 (faster; WORKSPACE.md decision log)")
    p.add_argument("--no-measure", action="store_true", help="peft / merged of ALTER / AsymLoRA runs: do not measure "
                   "the chosen expert's forget / retain answer probability (the run's gated figures are still printed)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def read_run(run_dir: Path):
    """``(RunConfig, MethodSpec)`` of a run folder, with one-line errors for what is missing."""
    from alter_jax import config as C
    from alter_jax.train.methods import get_method

    if not run_dir.is_dir():
        raise CliError(f"--run {run_dir}: no such folder; pass the output_dir of a finished bin/unlearn run")
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise CliError(f"--run {run_dir}: not a run folder (no config.json); pass the output_dir of bin/unlearn")
    try:
        run = C.build(json.loads(cfg_file.read_text())["config"])
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CliError(f"{cfg_file}: not a valid run config ({e}); it is written by bin/unlearn") from None
    return run, get_method(run.train.method)


def _load_backbone(run):
    from alter_jax.io.hf import load_pretrained
    from alter_jax.train.loop import resolve_run_model

    try:
        folder = resolve_run_model(run.model.name)
        model = load_pretrained(folder, dtype=run.model.dtype, param_dtype=run.model.param_dtype)
        return model, folder
    except (ValueError, OSError) as e:
        raise CliError(f"the run's base model {run.model.name!r} cannot be loaded: {e}") from None


def load_run_model(run_dir: Path, run):
    """The run's backbone with its adapter installed: ``(model, extra, base_folder)``."""
    from alter_jax.io.alter import load_alter_adapter

    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise CliError(f"--run {run_dir}: no adapter/ folder; the run is not finished (rerun bin/unlearn to finish it)")
    model, folder = _load_backbone(run)
    try:
        model, extra = load_alter_adapter(model, adapter)
    except ValueError as e:
        raise CliError(str(e)) from None
    return model, extra, folder


def _check_expert(expert: int, num_experts: int, method: str) -> None:
    if not 0 <= expert < num_experts:
        raise CliError(f"--expert {expert}: the {method} adapter has experts 0..{num_experts - 1} (0 = retain expert)")


def _overlaps(out: Path, folder: Path) -> str | None:
    """How ``out`` collides with ``folder`` ("is", "contains", "is inside") or None (symlinks resolved)."""
    o, f = out.expanduser().resolve(), folder.expanduser().resolve()
    if o == f:
        return "is"
    if o in f.parents:
        return "contains"
    if f in o.parents:
        return "is inside"
    return None


def check_out(out: Path, folder: Path, what: str, safe: str) -> None:
    """Refuse an ``--out`` that is, contains or lies inside ``folder`` (a run or model folder being
    read): writing there (and ``--overwrite``'s replace) would delete the files it exports from."""
    how = _overlaps(out, folder)
    if how is not None:
        raise CliError(f"--out {out} {how} the {what} {folder}; an export never writes over the files it reads "
                       f"(--overwrite would delete them). Choose a folder outside it, e.g. --out {safe}")


def export(run_dir: str | Path, fmt: str, out: str | Path, *, expert: int = 0, dtype: str | None = None,
           measure: bool = True, prompt_entropy: str = "base") -> dict:
    """Write ``fmt`` of the run in ``run_dir`` to ``out``; returns a summary dict.

    measure: for a PEFT / merged export of an ALTER / AsymLoRA run, score the chosen expert on
    the run's evaluation rows (``summary["expert_figures"]``) next to the run's gated figures.
    """
    from alter_jax.adapters.inject import adapted_layers, merged_backbone
    from alter_jax.io.alter import single_config
    from alter_jax.io.hf import atomic_dir, save_pretrained

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise CliError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    safe = f"exports/{run_dir.expanduser().resolve().name}_{fmt}"
    check_out(out, run_dir, "run folder", safe)
    run, method = read_run(run_dir)
    summary = {"run": str(run_dir), "method": method.name, "format": fmt, "out": str(out)}

    if not method.adapter:  # full-parameter run: the result is a whole model
        if fmt != "merged":
            raise CliError(f"--format {fmt}: the run used the full-parameter method {method.name!r}, which has no "
                           "adapter; use --format merged (the fine-tuned model)")
        src = run_dir / "model"
        if not (src / "config.json").is_file():
            raise CliError(f"--run {run_dir}: no model/ folder; the run is not finished (rerun bin/unlearn to finish it)")
        from alter_jax.io.hf import load_pretrained

        model = load_pretrained(src, dtype=run.model.dtype)
        save_pretrained(model, out, dtype=dtype, tokenizer=src)
        return summary
    if fmt == "transformers" and not method.asymmetric:
        raise CliError(f"--format transformers: the {method.name!r} run trained one plain LoRA, which needs no gate; "
                       "use --format merged (a plain Llama / Mistral folder) or --format peft")

    model, extra, base = load_run_model(run_dir, run)
    check_out(out, Path(base), "base model folder", safe)
    cfg = single_config(adapted_layers(model))
    summary.update(base_model=str(base), num_experts=cfg.num_experts, layers=len(adapted_layers(model)))
    if fmt == "alter":  # validated by the load above; copy the files unchanged
        with atomic_dir(out) as tmp:
            for f in (run_dir / "adapter").iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return summary
    report = run_report(run_dir)
    if fmt == "transformers":
        from alter_jax.io.transformers_export import save_transformers_alter

        gate = dict(gate_settings(run, extra), prompt_entropy=prompt_entropy)
        summary.update(gate)
        save_transformers_alter(model, out, **gate, tokenizer=Path(base), dtype=dtype,
                                readme=model_card(run, method, summary, report, extra))
        return summary
    _check_expert(expert, cfg.num_experts, method.name)
    summary["expert"] = expert
    if method.asymmetric:
        summary["gated_figures"] = gated_figures(report)
        if measure:
            from alter_jax.io.hf import load_tokenizer

            summary["expert_figures"] = expert_figures(model, expert, run, run_dir, load_tokenizer(base))
    if fmt == "peft":
        from alter_jax.io.peft import save_peft_adapter

        save_peft_adapter(model, out, expert=expert, base_model_name_or_path=str(base))
    else:
        save_pretrained(merged_backbone(model, expert), out, dtype=dtype, tokenizer=Path(base))
    if method.asymmetric:
        summary["warning"] = single_expert_warning(method.name, expert, cfg.num_experts)
        _write_readme(out, summary)
    return summary


def gate_settings(run, extra: dict) -> dict:
    """The gate the run evaluated with (``train.loop.model_eval_fns``): q, fitted θ, entropy source."""
    from alter_jax.gated import GateConfig

    g = GateConfig(q=run.entropy.q, threshold=float(extra.get("threshold", run.entropy.value)),
                   source=run.entropy.inference_source)
    return {"q": g.q, "threshold": g.threshold, "entropy_source": g.source, "self_iters": g.self_iters}


def run_report(run_dir: Path) -> dict | None:
    """The run's ``report.json`` (None when absent or unreadable)."""
    f = Path(run_dir) / "report.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def gated_figures(report: dict | None) -> dict | None:
    """``{side: answer_prob}`` after unlearning, as the run measured it (through the gated forward)."""
    if not report or "after" not in report:
        return None
    return {s: float(report["after"][s]["answer_prob"]) for s in ("forget", "retain") if s in report["after"]}


def eval_arrays(run, run_dir: Path, tok) -> dict:
    """The rows the run's report scored (``train.loop.quick_eval``): the first ``eval.num_questions``
    of each side, encoded as the run encoded them."""
    from alter_jax.train.loop import SIDES, load_rows
    from alter_jax.train.prepare import encode

    rows = dict(zip(SIDES, load_rows(run.data, Path(run_dir))))
    out = {}
    for s in SIDES:
        if run.data.kind == "text":
            from alter_jax.data.corpus import encode_texts

            arrays = encode_texts(tok, rows[s], run.model.max_length)
        else:
            arrays = encode(tok, rows[s], run.model.prompt_format, run.model.max_length)
        n = run.eval.num_questions or len(rows[s])
        out[s] = {k: v[:n] for k, v in arrays.items()}
    return out


def expert_figures(model, expert: int, run, run_dir: Path, tok) -> dict | None:
    """Forget / retain answer probability of ONE expert under hard routing (what a PEFT / merged
    export computes) on the run's evaluation rows; None (with the reason) if the data is unavailable."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from alter_jax.adapters.lora import HardRouting
    from alter_jax.train.loop import answer_probability

    try:
        arrays = eval_arrays(run, run_dir, tok)
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"the run's evaluation rows cannot be loaded ({e})"}
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m(ids, mask, adapter_ctx=HardRouting(expert=jnp.full((ids.shape[0],), expert, jnp.int32)))

    def fn(ids, mask):
        return np.asarray(logits(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))

    return {s: float(np.mean(answer_probability(fn, a, run.eval.batch_size, run.model.length_bucket)))
            for s, a in arrays.items()}


def figures_lines(summary: dict) -> list[str]:
    """The gated-vs-expert table of a single-expert export (plain text, also for the README)."""
    g, e = summary.get("gated_figures"), summary.get("expert_figures")
    fmt = lambda d, s: f"{d[s]:.3f}" if d and s in d else "-"  # noqa: E731
    lines = [f"{'answer probability':38s} {'forget':>7s} {'retain':>7s}",
             f"{'gated model (the run, Eq. 9)':38s} {fmt(g, 'forget'):>7s} {fmt(g, 'retain'):>7s}"
             + ("" if g else "   (no report.json in the run)")]
    if e and "error" in e:
        lines.append(f"this export (expert {summary['expert']}): not measured: {e['error']}")
    elif e:
        label = f"this export (expert {summary['expert']}, hard routing)"
        lines.append(f"{label:38s} {fmt(e, 'forget'):>7s} {fmt(e, 'retain'):>7s}")
    else:
        lines.append(f"this export (expert {summary['expert']}): not measured (--no-measure)")
    return lines


def single_expert_warning(method: str, expert: int, num_experts: int) -> str:
    """Why a PEFT / merged export of an ALTER / AsymLoRA run is not the model the run measured."""
    which = ("expert 0 is the retain expert: it was trained to keep answers, so this model has NOT forgotten the "
             "forget set" if expert == 0 else
             f"expert {expert} is a forget expert: it forgets its sub-domain but, used for every token, also damages "
             "answers it should keep")
    return (f"this {method} export holds one expert under hard routing, not the entropy-gated mixture the run "
            f"evaluated (Eq. 9): {which}. Only the gated formats reproduce the run's forget/retain figures: "
            f"bin/export --format transformers (PyTorch, trust_remote_code=True) or bin/export --format alter "
            f"(alter-jax, alter_jax.io.alter.load_alter_adapter); experts 0..{num_experts - 1}.")


def _write_readme(out: Path, summary: dict) -> None:
    table = "\n".join("    " + l for l in figures_lines(summary))
    text = (f"# {summary['format']} export of {summary['run']} ({summary['method']}, expert {summary['expert']})\n\n"
            f"**WARNING: {summary['warning']}**\n\n"
            f"Measured on the run's evaluation rows (exp(-mean answer-token NLL), TOFU's Prob.):\n\n{table}\n")
    (out / "README.md").write_text(text)


def model_card(run, method, summary: dict, report: dict | None, extra: dict) -> str:
    """README.md of a ``--format transformers`` export: what was unlearned, the run's figures, how to load."""
    data = (report or {}).get("data") or extra.get("data") or {}
    sub = data.get("subdomains") or {}
    n_f, n_r = data.get("forget", "?"), data.get("retain", "?")
    src = run.data.source
    lines = [
        f"# ALTER-unlearned {Path(str(run.model.name)).name} ({method.name}, alter-jax)", "",
        "## What was unlearned", "",
        f"This model was trained to **forget the answers of `{run.data.forget_split}` of `{src}`** ({n_f} question/answer "
        f"rows{', in ' + str(data.get('num_forget_experts')) + ' sub-domains' if data.get('num_forget_experts') else ''}"
        f"{' (' + str(sub.get('source')) + ')' if sub.get('source') else ''}) and to **keep `{run.data.retain_split}`** "
        f"({n_r} rows), with {method.name} (Asymmetric LoRA, token-entropy-guided; base model `{run.model.name}`, "
        f"{report.get('steps', '?') if report else '?'} steps).",
        "Unlearning lowers the probability of the forgotten answers; it is not a proof that the information cannot "
        "be recovered (e.g. by fine-tuning on part of it: a relearning attack).", "",
        "## Figures of the run (through the entropy-gated forward)", "",
        "Answer probability = exp(-mean answer-token NLL) (TOFU's Prob.); ROUGE-L recall of greedy answers.", "",
    ]
    if report and "before" in report and "after" in report:
        lines += ["| model | forget prob | forget ROUGE-L | retain prob | retain ROUGE-L |", "|---|---|---|---|---|"]
        for name in ("before", "after"):
            r = report[name]
            lines.append(f"| {'base model' if name == 'before' else 'this model'} | {r['forget']['answer_prob']:.4f} | "
                         f"{r['forget']['rouge_l_recall']:.4f} | {r['retain']['answer_prob']:.4f} | "
                         f"{r['retain']['rouge_l_recall']:.4f} |")
        n = report["after"]["forget"].get("n")
        lines += ["", f"Measured by alter-jax on the first {n} rows of each side. This export reproduces the gated "
                  "model's logits (tests/crosscheck/test_transformers_export.py: logits within 1e-4, greedy tokens "
                  "identical, the answer probabilities within 1e-3)."]
        for w in report.get("warnings") or []:
            lines.append(f"\n**Warning of the run:** {w}")
    else:
        lines.append("The run folder had no report.json: no figures.")
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{Path(summary["out"]).name}", trust_remote_code=True)',
        f'tok = AutoTokenizer.from_pretrained("{Path(summary["out"]).name}", trust_remote_code=True)',
        'print(tok.decode(model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)[0]))',
        "```", "",
        "`trust_remote_code=True` is required: `modeling_alter.py` (torch + transformers only) runs the gated forward "
        "(the tokenizer needs it too, only to read `config.json`; `pipeline(..., trust_remote_code=True)` works). "
        "**Do not load the weights as a plain Llama / Mistral**: the backbone alone is the base model, which has NOT "
        "forgotten anything (`model_type` is `alter_*` so that this fails loudly).", "",
        "## How the gate works", "",
        f"Every adapted projection ({len(extra.get('layers', [])) or summary.get('layers')} layers) computes "
        "`y = W0 x + s · Σ_e w_e B_e A x` with a shared `A`, a retain expert `B_0` and forget experts `B_1..N`; "
        "the router reads `[x / rms(x); S]`, where `S` is the Tsallis entropy (q = "
        f"{summary['q']:g}) of the distribution that produced the token. High-entropy tokens (S > θ = "
        f"{summary['threshold']:.4g}) mix the top-{run.adapter.top_k} experts (τ = {run.adapter.tau_high}); the others "
        f"take the router's argmax (τ = {run.adapter.tau_low}); the retain expert's router logit gets "
        f"+{run.adapter.retain_bias} (alter-jax's logit adjustment; 0 = the paper's router).",
        f"Entropy source: `{summary['entropy_source']}` (prompt / scored tokens from one extra forward of the frozen "
        "backbone); each generated token takes the entropy of the gated model's distribution it was drawn from. "
        + ("Hence a prompt costs one extra backbone forward." if summary.get("prompt_entropy", "base") == "base" else
         "This export was written with `prompt_entropy=zero`: generate() skips that backbone forward and gives every "
         "prompt token S = 0 (low entropy); scoring a text still uses the backbone's entropies.")
        + " Beam search and assisted decoding are not supported.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    check_out(out, Path(args.run), "run folder", f"exports/{Path(args.run).expanduser().resolve().name}_{args.format}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CliError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    s = export(args.run, args.format, out, expert=args.expert, dtype=args.dtype, measure=not args.no_measure,
               prompt_entropy=args.prompt_entropy)
    what = {"alter": "ALTER adapter (all experts, router, entropy settings)",
            "transformers": "gated ALTER model for transformers (trust_remote_code=True)",
            "peft": f"PEFT LoRA of expert {s.get('expert')}",
            "merged": f"merged Hugging Face model (expert {s.get('expert', '-')})"}[args.format]
    print(f"{what} of {s['run']} ({s['method']}) -> {s['out']}")
    if "warning" in s:
        print(f"WARNING: {s['warning']} (also in {Path(s['out']) / 'README.md'})", file=sys.stderr)
        for line in figures_lines(s):
            print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
