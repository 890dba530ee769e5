"""``evaluate``: evaluation commands (one subcommand each).

    bin/evaluate tofu-aggregate --logs DIR [--retain-logs DIR] [--json]
    bin/evaluate tofu --model PATH --out DIR [--data SRC] [--forget-split forget10] [--json OUT] ...
    bin/evaluate relearn --run RUN [--steps 0,1,2,4,8,16] [--mode auto|adapter|full|lora] ...
    bin/evaluate routing --run RUN [--num-questions N] [--no-grid]   (ALTER: routing of generated tokens)

Subcommands live in a registry so other modules can add theirs (``mcq``, ``muse``, ...):

    from alter_jax.cli.evaluate import subcommand

    @subcommand("mcq", help="multiple-choice accuracy")
    def _mcq_args(p):            # fills the subparser
        p.add_argument(...)
        return run_mcq           # run(args) -> int exit code

User errors (``ValueError`` subclasses with a message, ``FileNotFoundError``) print
``error: ...`` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

Runner = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register a subcommand: the decorated function fills its parser and returns the runner."""

    def deco(fn: Callable[[argparse.ArgumentParser], Runner]):
        _SUBCOMMANDS[name] = (help, fn)
        return fn

    return deco


# ------------------------------------------------------------------ tofu-aggregate


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2e}" if (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"


@subcommand("tofu-aggregate", help="Forget Quality and Model Utility from TOFU log folders")
def _tofu_aggregate_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--logs", required=True, help="folder with eval_log_forget.json, eval_log.json, "
                   "eval_real_author_wo_options.json, eval_real_world_wo_options.json (ours or TOFU's)")
    p.add_argument("--retain-logs", default=None, help="the retain model's log folder (for Forget Quality)")
    p.add_argument("--json", action="store_true", help="print one JSON object "
                   "(forget_quality, model_utility, parts, forget, ks_statistic)")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.tofu import aggregate

        res = aggregate(args.logs, args.retain_logs)
        if args.json:
            print(json.dumps(res))
            return 0
        print(f"logs: {args.logs}")
        if args.retain_logs:
            print(f"Forget Quality (KS p-value vs {args.retain_logs}): {_fmt(res['forget_quality'])}"
                  f"  (KS statistic {_fmt(res['ks_statistic'])})")
        else:
            print("Forget Quality: n/a (pass --retain-logs)")
        print(f"Model Utility: {_fmt(res['model_utility'])}")
        print(f"Aggregate (harmonic mean of FQ and MU): {_fmt(res['aggregate'])}")
        for k, v in res["parts"].items():
            print(f"  {k:<26} {_fmt(v)}")
        for k, v in res["forget"].items():
            print(f"  {k:<26} {_fmt(v)}")
        return 0

    return run


# ----------------------------------------------------------------------------- tofu

TOFU_DEFAULTS = {"data": "locuslab/TOFU", "forget_split": "forget10", "prompt_format": "auto"}


def tofu_settings(args: argparse.Namespace) -> dict:
    """Fill ``--data / --forget-split / --prompt-format`` left unset: from the run's own config with
    ``--run`` (a run is scored as it was trained and measured), else the TOFU defaults. Sets them on
    ``args`` and returns ``{"from": {key: "--flag" | "run" | "default"}}``."""
    run_cfg = None
    if getattr(args, "run", None):
        from pathlib import Path

        from alter_jax import config as C

        cfg_file = Path(args.run) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{args.run}: not a run folder (no config.json); pass the output_dir of bin/unlearn")
        run_cfg = C.build(json.loads(cfg_file.read_text())["config"])
        if run_cfg.data.kind != "qa":
            raise ValueError(f"--run {args.run}: the run trained on plain text (data.kind={run_cfg.data.kind!r}); TOFU "
                             "scores question/answer rows: pass --data and --forget-split of a TOFU source")
    src = {}
    for key, default in TOFU_DEFAULTS.items():
        if getattr(args, key) is not None:
            src[key] = "--" + key.replace("_", "-")
        elif run_cfg is not None:
            from pathlib import Path

            from alter_jax.train.loop import resolve_data_source

            value = {"data": lambda: resolve_data_source(run_cfg.data, Path(args.run)),
                     "forget_split": lambda: run_cfg.data.forget_split,
                     "prompt_format": lambda: run_cfg.model.prompt_format}[key]()
            setattr(args, key, value)
            src[key] = "run"
        else:
            setattr(args, key, default)
            src[key] = "default"
    return {"from": src}



TOFU_METRICS_HELP = """\
metrics (docs/eval_definitions.md gives each formula and its source):
  per split (forget, retain, real_authors, world_facts; with --paraphrased-questions also
  forget_paraphrased_question, retain_paraphrased_question):
    prob                   mean exp(-avg answer NLL) (real_authors / world_facts: p_true / sum p)
    rouge_l_recall         ROUGE-L recall of the greedy answer
    truth_ratio            TOFU: forget mean min(r, 1/r); others mean max(0, 1 - 1/r)
    truth_ratio_prob_mean  open-unlearning prob_mean: mean p_c / (p_c + p_w)
    exact_memorization     share of answer tokens that are the teacher-forced argmax
    extraction_strength    1 - (shortest prefix share after which argmax reproduces the answer)
    degenerate_rate        share of greedy answers that are empty, letterless, or one whitespace-token
                           run / one character run covering more than half of the answer
    rep_4                  mean repeated 4-gram rate of the greedy answers
    distinct_1, distinct_2 mean distinct unigram / bigram share of the greedy answers
    generated_ppl          mean perplexity of the greedy answers under the untouched backbone
                           (--fluency-model; with --run the run's base model), prompt + answer scored,
                           answer tokens averaged; generated_ppl_median their median
  membership inference, forget vs holdout rows (--holdout), AUC as open-unlearning:
    mia_loss_auc, mia_zlib_auc, mia_min_k_auc, mia_min_k_plus_plus_auc, mia_gradnorm_auc,
    mia_reference_auc (needs --reference-model)
  aggregates:
    privleak               (AUC'_unlearned - AUC'_retain) / AUC'_retain x 100, AUC' = 1 - mia_min_k_auc
    forget_quality         KS-test p-value of forget truth ratios vs the retain model (--retain-logs)
    model_utility          harmonic mean of 9 retain / real authors / world facts numbers
    aggregate              harmonic mean of forget_quality and model_utility
outputs: TOFU legacy logs (eval_log*.json), open-unlearning TOFU_EVAL.json / TOFU_SUMMARY.json,
summary.json, and with --json OUT one object with all of the above.
"""


@subcommand("tofu", help="run the TOFU evaluation on a model (legacy logs, TOFU_EVAL.json, summary.json)")
def _tofu_args(p: argparse.ArgumentParser) -> Runner:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = TOFU_METRICS_HELP
    _model_args(p)
    p.add_argument("--out", required=True, help="output folder for the logs")
    p.add_argument("--data", default=None, help="TOFU folder or hub id (default: the run's data.source with --run, "
                   f"else {TOFU_DEFAULTS['data']})")
    p.add_argument("--forget-split", default=None, help="forget01 / forget05 / forget10 (default: the run's "
                   f"data.forget_split with --run, else {TOFU_DEFAULTS['forget_split']})")
    p.add_argument("--prompt-format", default=None, help="auto, llama2, chat, chatml, llama3, zephyr, plain (default: "
                   f"the run's model.prompt_format with --run, else {TOFU_DEFAULTS['prompt_format']})")
    p.add_argument("--system-prompt", default=None,
                   help="system message for chat formats: a preset (helpful, helpful-dated, or an open-unlearning "
                        "model config name such as Llama-3.2-1B-Instruct, which adds its date line) or literal text; "
                        "default none (TOFU's original)")
    p.add_argument("--ds-size", type=int, default=0, help="first N rows per split (default 0 = all, as "
                   "open-unlearning; TOFU's original code uses 300)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=200, help="scoring length (prompt + answer)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="new tokens per greedy answer (default 200)")
    p.add_argument("--generation-max-length", type=int, default=None,
                   help="TOFU's original budget instead: prompt + answer tokens (overrides --max-new-tokens)")
    p.add_argument("--paraphrased-questions", action="store_true",
                   help="also evaluate forget and retain asking paraphrased_question (open-unlearning question_key)")
    p.add_argument("--holdout", default="auto",
                   help="holdout rows for the attacks: auto (hub holdoutXX if the data has it), none, a split "
                        "name, or full:A-B (TOFU authors A..B of full.json, for models that never saw them)")
    p.add_argument("--attacks", default="loss,zlib,min_k,min_k_plus_plus,gradnorm,reference",
                   help="comma list of membership attacks (reference runs only with --reference-model)")
    p.add_argument("--reference-model", default=None, help="reference model for the reference-based attack")
    p.add_argument("--fluency-model", default=None,
                   help="the untouched backbone that scores the greedy answers for generated_ppl (default: with --run "
                        "the run's base model, else the evaluated model itself); 'none' skips generated_ppl")
    p.add_argument("--mia-k", type=float, default=0.4, help="k of Min-K%% and Min-K%%++ (default 0.4)")
    p.add_argument("--gradnorm-p", type=float, default=2.0, help="p-norm of GradNorm (1, 2 or inf)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--retain-logs", default=None,
                   help="retain model's logs (folder of legacy logs or TOFU_EVAL.json) for Forget Quality / PrivLeak")
    p.add_argument("--json", default=None, dest="json_out", help="write the metrics object to this JSON file")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.tofu import evaluate_tofu

        used = tofu_settings(args)
        print("settings: " + ", ".join(f"{k} {getattr(args, k)} ({used['from'][k]})" for k in TOFU_DEFAULTS), file=sys.stderr)
        attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        logits_fn, generate_fn, tok, model, forward = _load_model_tofu(args)
        gradnorm_fn = None
        if "gradnorm" in attacks:
            from alter_jax.gradnorm import model_gradnorm_fn

            gradnorm_fn = model_gradnorm_fn(model, p=args.gradnorm_p, forward=forward)
        ref_fn = None
        if args.reference_model:
            from alter_jax.generate import model_fns
            from alter_jax.io.hf import load_pretrained

            ref_fn = model_fns(load_pretrained(args.reference_model, dtype=args.dtype))[0]
        ppl_fn, ppl_name = _fluency_model(args, logits_fn)
        max_new = None if args.generation_max_length else args.max_new_tokens
        res = evaluate_tofu(
            logits_fn, generate_fn, tok, args.out, forget_split=args.forget_split, source=args.data,
            fmt=args.prompt_format, ds_size=args.ds_size or None, batch_size=args.batch_size,
            max_length=args.max_length, generation_max_length=args.generation_max_length,
            max_new_tokens=max_new, retain_logs=args.retain_logs, progress=not args.no_progress,
            system_prompt=args.system_prompt, paraphrased_questions=args.paraphrased_questions,
            holdout=args.holdout, attacks=attacks, gradnorm_fn=gradnorm_fn, reference_logits_fn=ref_fn,
            mia_k=args.mia_k, ppl_logits_fn=ppl_fn, ppl_reference=ppl_name,
        )
        metrics = res["metrics"]
        if args.json_out:
            from pathlib import Path

            Path(args.json_out).write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
        return 0

    return run


def _fluency_model(args: argparse.Namespace, logits_fn):
    """``(LogitsFn or None, name)`` of the model that scores generated answers (generated_ppl):
    ``--fluency-model``, else the run's base model (``--run``: the untouched backbone), else the
    evaluated model itself."""
    from alter_jax.generate import model_fns

    name = getattr(args, "fluency_model", None)
    if name == "none":
        return None, None
    if name:
        from alter_jax.io.hf import load_pretrained

        return model_fns(load_pretrained(name, dtype=args.dtype))[0], name
    if getattr(args, "run", None):
        from pathlib import Path

        from alter_jax import config as C
        from alter_jax.train.loop import load_model_and_tokenizer

        run = C.build(json.loads((Path(args.run) / "config.json").read_text())["config"])
        base, _, folder = load_model_and_tokenizer(run.model, progress=False)
        return model_fns(base)[0], f"{folder} (the run's base model)"
    return logits_fn, f"{args.model} (the evaluated model itself; pass --fluency-model for the backbone)"


def _load_model_tofu(args: argparse.Namespace):
    """(logits_fn, generate_fn, tokenizer, NNX model, forward for GradNorm) for --model or --run;
    ALTER / AsymLoRA runs differentiate through the entropy-gated forward."""
    from alter_jax.io.hf import load_tokenizer

    forward = None
    if getattr(args, "run", None):
        from pathlib import Path

        from alter_jax import config as C
        from alter_jax.train.loop import load_run_result
        from alter_jax.train.methods import get_method

        model, tok, lf, gf = load_run_result(args.run)
        run = C.build(json.loads((Path(args.run) / "config.json").read_text())["config"])
        adapter_cfg = Path(args.run) / "adapter" / "alter_config.json"
        if get_method(run.train.method).asymmetric and adapter_cfg.is_file():
            from alter_jax.gated import GateConfig, gated_logits

            extra = json.loads(adapter_cfg.read_text()).get("extra", {})
            gate = GateConfig(q=run.entropy.q, threshold=float(extra.get("threshold", run.entropy.value)),
                              source=run.entropy.inference_source)
            forward = lambda m, ids, mask: gated_logits(m, ids, mask, gate)  # noqa: E731
    else:
        from alter_jax.generate import model_fns
        from alter_jax.io.hf import load_pretrained

        model = load_pretrained(args.model, dtype=getattr(args, "dtype", "float32"))
        lf, gf = model_fns(model)
        tok = load_tokenizer(args.model)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    return lf, gf, tok, model, forward


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="HF model folder, hub id, registry name or .gguf")
    g.add_argument("--run", help="a bin/unlearn output folder (ALTER/AsymLoRA: entropy-gated forward)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / id (default: the model's)")


def _check_run_folder(args: argparse.Namespace) -> None:
    """A cheap check of ``--run`` before slower work (question sets, the model)."""
    from pathlib import Path

    if getattr(args, "run", None) and not (Path(args.run) / "config.json").is_file():
        raise FileNotFoundError(f"{args.run}: not a run folder (no config.json); pass the output_dir of bin/unlearn")


def _load_model(args: argparse.Namespace):
    """(logits_fn, generate_fn, tokenizer) for --model or --run."""
    from alter_jax.io.hf import load_tokenizer

    if getattr(args, "run", None):
        from alter_jax.train.loop import load_run_result

        _, tok, lf, gf = load_run_result(args.run)
    else:
        from alter_jax.generate import model_fns
        from alter_jax.io.hf import load_pretrained

        lf, gf = model_fns(load_pretrained(args.model, dtype=getattr(args, "dtype", "float32")))
        tok = load_tokenizer(args.model)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    return lf, gf, tok


@subcommand("mcq", help="zero-shot multiple choice (WMDP bio/cyber, MMLU) by answer-letter log-likelihood")
def _mcq_args(p: argparse.ArgumentParser) -> Runner:
    _model_args(p)
    p.add_argument("--tasks", default="wmdp-bio,wmdp-cyber,mmlu",
                   help="comma list: wmdp-bio, wmdp-cyber, mmlu, mmlu:<subject> or local .json/.jsonl/.parquet files")
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.data.mcq import load_mcq
        from alter_jax.eval.mcq import evaluate_mcq

        _check_run_folder(args)
        tasks = {t: load_mcq(t, limit=args.limit) for t in [t.strip() for t in args.tasks.split(",") if t.strip()]}
        logits_fn, _, tok = _load_model(args)  # after the questions: a bad task name fails before the model loads
        results = {}
        for task, items in tasks.items():
            res = evaluate_mcq(items, logits_fn, tok, batch_size=args.batch_size, progress=not args.no_progress)
            results[task] = {"accuracy": res.accuracy, "macro_accuracy": res.macro_accuracy,
                             "per_subject": res.per_subject}
            print(f"{task:24s} accuracy {res.accuracy:.4f}  (n={len(res.predictions)})")
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        return 0

    return run


@subcommand("relearn", help="relearning attack: fine-tune an unlearned run for k steps on part of its forget set, "
            "report recovery on the rest (ALTER: through the gated forward)")
def _relearn_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--run", required=True, help="a finished bin/unlearn output folder")
    p.add_argument("--steps", default="0,1,2,4,8,16", help="schedule of k (increasing, comma list)")
    p.add_argument("--mode", default="auto", choices=("auto", "adapter", "full", "lora"),
                   help="attacker parameters: adapter = the run's own adapter (ALTER: A, experts, router), full = every "
                   "parameter, lora = a fresh LoRA on the merged model (auto: adapter for ALTER / AsymLoRA, else lora)")
    p.add_argument("--lr", type=float, default=None, help="attacker learning rate (default 1e-3; 1e-4 for full)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-frac", type=float, default=0.5, help="share of the forget rows the attacker trains on")
    p.add_argument("--seed", type=int, default=0, help="split and batch order")
    p.add_argument("--rank", type=int, default=8, help="lora mode: rank")
    p.add_argument("--alpha", type=float, default=16.0, help="lora mode: alpha")
    p.add_argument("--num-eval", type=int, default=0, help="score the first N held-out rows (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer length (default: the run's)")
    p.add_argument("--no-reference", action="store_true", help="skip scoring the model before unlearning")
    p.add_argument("--out", default=None, help="output folder (default: <run>/relearn)")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.relearn import RelearnConfig, relearn

        try:
            steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--steps {args.steps!r}: give integers separated by commas, e.g. 0,1,2,4,8") from None
        cfg = RelearnConfig(steps=steps, mode=args.mode, lr=args.lr, batch_size=args.batch_size,
                            train_frac=args.train_frac, seed=args.seed, rank=args.rank, alpha=args.alpha,
                            num_eval=args.num_eval, max_new_tokens=args.max_new_tokens, reference=not args.no_reference)
        res = relearn(args.run, cfg, out=args.out, progress=not args.no_progress)
        print("wrote " + ", ".join(res["files"]))
        return 0

    return run


@subcommand("routing", help="ALTER diagnostic: where generated tokens route (expert, entropy, high/low), what each "
            "expert predicts there, and inference settings (retain_bias, top_k, tau_high, entropy source) scored")
def _routing_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--run", required=True, help="a finished ALTER / AsymLoRA bin/unlearn output folder")
    p.add_argument("--num-questions", type=int, default=0, help="forget and retain questions each (0: the run's eval)")
    p.add_argument("--no-grid", action="store_true", help="only the trace, no settings grid")
    p.add_argument("--settings", default=None,
                   help="the grid instead of the default one: settings separated by ';', changes joined by '+', e.g. "
                        "'retain_bias=0;retain_bias=3;top_k=1+tau_high=2;generation_source=base'")
    p.add_argument("--trace-sources", default="self,base", help="entropy sources traced (self, base or both)")
    p.add_argument("--out", default=None, help="folder for routing.json (default: the run folder)")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.routing import DEFAULT_GRID, parse_settings, run_routing_diagnostic

        _check_run_folder(args)
        grid = () if args.no_grid else (parse_settings(args.settings) if args.settings else DEFAULT_GRID)
        sources = tuple(s.strip() for s in args.trace_sources.split(",") if s.strip())
        if not set(sources) <= {"self", "base"}:
            raise ValueError(f"--trace-sources {args.trace_sources!r}: choose from self, base")
        run_routing_diagnostic(args.run, num_questions=args.num_questions, grid=grid, out=args.out,
                               log=lambda m: print(m, file=sys.stderr), sources=sources)
        print(f"wrote {args.out or args.run}/routing.json")
        return 0

    return run


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description="alter-jax evaluation commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_, fill) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_run=fill(sp))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
