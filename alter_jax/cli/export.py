"""``bin/export``: turn a finished unlearning run into a deployable artefact.

    bin/export --run runs/demo --format alter  --out exports/demo_alter    # the whole ALTER adapter
    bin/export --run runs/demo --format peft   --out exports/demo_peft     # a PEFT LoRA (one expert)
    bin/export --run runs/demo --format merged --expert 0 --out exports/demo_merged

Formats (``RUN_DIR`` holds ``config.json`` and ``adapter/`` or ``model/``):

* ``alter``  — every expert, the router and the entropy settings (``alter_jax.io.alter``),
  validated by loading it into the run's backbone, then copied. Only alter-jax can run the
  entropy-gated forward (Eq. 9) it needs.
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
export prints this and writes it into the export's README.md. Only ``alter`` (with
alter-jax's gated forward) reproduces the run's figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from alter_jax.cli.common import CliError

FORMATS = ("alter", "peft", "merged")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (the output_dir of bin/unlearn)")
    p.add_argument("--format", required=True, choices=FORMATS, help="alter | peft | merged (see above)")
    p.add_argument("--expert", type=int, default=0, help="expert for peft / merged: 0 = retain expert, 1..N forget experts "
                   "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="merged: weight dtype of the saved model (default: the run's parameter dtype)")
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


def export(run_dir: str | Path, fmt: str, out: str | Path, *, expert: int = 0, dtype: str | None = None) -> dict:
    """Write ``fmt`` of the run in ``run_dir`` to ``out``; returns a summary dict."""
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
    _check_expert(expert, cfg.num_experts, method.name)
    summary["expert"] = expert
    if fmt == "peft":
        from alter_jax.io.peft import save_peft_adapter

        save_peft_adapter(model, out, expert=expert, base_model_name_or_path=str(base))
    else:
        save_pretrained(merged_backbone(model, expert), out, dtype=dtype, tokenizer=Path(base))
    if method.asymmetric:
        summary["warning"] = single_expert_warning(method.name, expert, cfg.num_experts)
        _write_readme(out, summary)
    return summary


def single_expert_warning(method: str, expert: int, num_experts: int) -> str:
    """Why a PEFT / merged export of an ALTER / AsymLoRA run is not the model the run measured."""
    which = ("expert 0 is the retain expert: it was trained to keep answers, so this model has NOT forgotten the "
             "forget set" if expert == 0 else
             f"expert {expert} is a forget expert: it forgets its sub-domain but, used for every token, also damages "
             "answers it should keep")
    return (f"this {method} export holds one expert under hard routing, not the entropy-gated mixture the run "
            f"evaluated (Eq. 9): {which}. The run's forget/retain figures hold only through alter-jax's gated forward "
            f"(bin/export --format alter, then alter_jax.io.alter.load_alter_adapter); experts 0..{num_experts - 1}.")


def _write_readme(out: Path, summary: dict) -> None:
    text = (f"# {summary['format']} export of {summary['run']} ({summary['method']}, expert {summary['expert']})\n\n"
            f"**WARNING: {summary['warning']}**\n")
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    check_out(out, Path(args.run), "run folder", f"exports/{Path(args.run).expanduser().resolve().name}_{args.format}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CliError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    s = export(args.run, args.format, out, expert=args.expert, dtype=args.dtype)
    what = {"alter": "ALTER adapter (all experts, router, entropy settings)",
            "peft": f"PEFT LoRA of expert {s.get('expert')}",
            "merged": f"merged Hugging Face model (expert {s.get('expert', '-')})"}[args.format]
    print(f"{what} of {s['run']} ({s['method']}) -> {s['out']}")
    if "warning" in s:
        print(f"WARNING: {s['warning']} (also in {Path(s['out']) / 'README.md'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
