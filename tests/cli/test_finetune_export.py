"""bin/finetune and bin/export on demo-size pieces; --help of bench/finetune/export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.adapters.lora import HardRouting
from alter_jax.cli import export as export_cli
from alter_jax.cli import finetune as finetune_cli
from alter_jax.io.hf import load_pretrained
from alter_jax.train.loop import resolve_run_model, unlearn
from tests.train.test_loop import demo_run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tool", ["bench", "finetune", "export"])
def test_help(tool):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / tool), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: {tool}" in proc.stdout and "--" in proc.stdout


def test_finetune_demo_split_saves_a_loadable_hf_folder(tmp_path):
    out = tmp_path / "ft"
    argv = ["--model", "demo-tiny", "--data", "demo", "--split", "forget25", "--out", str(out), "--epochs", "1",
            "--lr", "1e-3", "--batch-size", "8", "--max-length", "96", "--prompt-format", "llama2", "--no-progress"]
    assert finetune_cli.main(argv) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "finetune.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "finetune.json").read_text())
    assert info["rows"] == 40 and info["steps"] == 5 and all(np.isfinite(info["losses"]))
    base = load_pretrained(resolve_run_model("demo-tiny"))
    tuned = load_pretrained(out)
    assert not np.allclose(np.asarray(tuned.embed_tokens[...]), np.asarray(base.embed_tokens[...]))  # it trained
    # transformers loads it and agrees with our forward
    import torch
    from transformers import AutoModelForCausalLM

    ids = np.array([[1, 5, 9, 14, 20, 33]], np.int32)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(tuned(jnp.asarray(ids))), ref, atol=1e-4, rtol=1e-4)


def test_finetune_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SystemExit) as e:
        finetune_cli.main(["--model", "demo-tiny", "--data", "demo", "--out", str(tmp_path / "full")])
    assert e.value.code == 2 and "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_cli.main(["--model", "demo-tiny", "--data", "demo", "--split", "nosuch", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.startswith("error: --data demo --split nosuch") and "\n" == err[-1] and err.count("\n") == 1


@pytest.fixture(scope="module")
def alter_run(tmp_path_factory):
    """A finished 2-step ALTER run on the demo model (2 forget experts)."""
    d = tmp_path_factory.mktemp("run")
    run = demo_run(d / "run", train={"max_steps": 2, "epochs": 1},
                   eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2})
    unlearn(run, progress=False, log=lambda *_: None)
    return d / "run"


def _our_logits(run_dir: Path, ids: np.ndarray, expert: int) -> np.ndarray:
    model, _, _ = export_cli.load_run_model(run_dir, export_cli.read_run(run_dir)[0])
    ctx = HardRouting(expert=jnp.full((ids.shape[0],), expert, jnp.int32))
    return np.asarray(model(jnp.asarray(ids), adapter_ctx=ctx))


def test_merged_export_loads_in_transformers_with_the_experts_logits(alter_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.array([[1, 7, 30, 41, 52, 60, 71, 80], [1, 9, 11, 13, 200, 300, 400, 500]], np.int32)
    outs = {}
    for expert in (0, 2):
        out = tmp_path / f"merged{expert}"
        assert export_cli.main(["--run", str(alter_run), "--format", "merged", "--expert", str(expert), "--out", str(out)]) == 0
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        AutoTokenizer.from_pretrained(str(out))  # the tokenizer travels with the model
        with torch.no_grad():
            outs[expert] = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(outs[expert], _our_logits(alter_run, ids, expert), atol=2e-4, rtol=1e-4)
    assert np.abs(outs[0] - outs[2]).max() > 1e-4  # the experts differ after training


def test_peft_export_of_one_expert_matches_hard_routing(alter_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    assert export_cli.main(["--run", str(alter_run), "--format", "peft", "--expert", "1", "--out", str(out)]) == 0
    base = export_cli.read_run(alter_run)[0].model.name
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_run_model(base)), dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(out)).eval()
    ids = np.array([[1, 7, 30, 41, 52, 60]], np.int32)
    with torch.no_grad():
        ref = pm(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ref, _our_logits(alter_run, ids, 1), atol=2e-4, rtol=1e-4)


def test_alter_export_is_the_validated_adapter(alter_run, tmp_path):
    out = tmp_path / "alter"
    assert export_cli.main(["--run", str(alter_run), "--format", "alter", "--out", str(out)]) == 0
    src = alter_run / "adapter"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in src.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_export_errors(alter_run, tmp_path, capsys):
    def fails(argv, needle):
        with pytest.raises(SystemExit) as e:
            export_cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, err

    fails(["--run", str(tmp_path / "nope"), "--format", "alter", "--out", str(tmp_path / "o")], "no such folder")
    (tmp_path / "empty").mkdir()
    fails(["--run", str(tmp_path / "empty"), "--format", "alter", "--out", str(tmp_path / "o")], "not a run folder")
    fails(["--run", str(alter_run), "--format", "onnx", "--out", str(tmp_path / "o")], "invalid choice: 'onnx'")
    fails(["--run", str(alter_run), "--format", "merged", "--expert", "7", "--out", str(tmp_path / "o")],
          "--expert 7: the alter adapter has experts 0..2")
    assert not (tmp_path / "o").exists()
    # a run without its result yet
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((alter_run / "config.json").read_text())
    fails(["--run", str(unfinished), "--format", "merged", "--out", str(tmp_path / "o")], "no adapter/ folder")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_writes_over_the_run_or_the_base_model(alter_run, tmp_path, capsys):
    """issue 14: ``--out R --overwrite`` deleted the whole run folder. Refused now, nothing lost."""
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(alter_run, run)
    base = tmp_path / "base"
    shutil.copytree(resolve_run_model(export_cli.read_run(run)[0].model.name), base)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["model"]["name"] = str(base)
    (run / "config.json").write_text(json.dumps(cfg))
    before_run, before_base = _tree(run), _tree(base)
    for out, how, what in ((run, "is", "run folder"), (run.parent, "contains", "run folder"),
                           (run / "adapter", "is inside", "run folder"), (base, "is", "base model folder"),
                           (tmp_path, "contains", "run folder")):
        for fmt in ("alter", "transformers", "peft", "merged"):
            with pytest.raises(SystemExit) as e:
                export_cli.main(["--run", str(run), "--format", fmt, "--out", str(out), "--overwrite"])
            err = capsys.readouterr().err
            assert e.value.code == 2, err
            assert f"--out {out} {how} the {what}" in err and f"--out exports/r_{fmt}" in err, err
            assert "Traceback" not in err and err.count("\n") == 1, err
            assert _tree(run) == before_run and _tree(base) == before_base  # no file lost or changed
    # the safe choice works
    assert export_cli.main(["--run", str(run), "--format", "alter", "--out", str(tmp_path / "exports" / "r_alter")]) == 0
    assert _tree(run) == before_run


def test_single_expert_export_of_alter_warns_loudly_and_in_its_readme(alter_run, tmp_path, capsys):
    """issue 14: ALTER's PEFT / merged exports do not forget (expert 0 is the retain expert) and said nothing."""
    before = _tree(alter_run)
    for fmt, expert in (("peft", 0), ("merged", 0), ("peft", 1)):
        out = tmp_path / f"{fmt}{expert}"
        assert export_cli.main(["--run", str(alter_run), "--format", fmt, "--expert", str(expert), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "WARNING: this alter export holds one expert under hard routing, not the entropy-gated mixture" in err
        readme = (out / "README.md").read_text()
        assert "WARNING" in readme and "bin/export --format alter" in readme and "--format transformers" in err
        # issue 18: what the chosen expert measured, beside the run's gated figures, in both places
        report = json.loads((alter_run / "report.json").read_text())
        gated = f"{report['after']['forget']['answer_prob']:.3f}"
        for text in (err, readme):
            row = next(l for l in text.splitlines() if f"this export (expert {expert}, hard routing)" in l).split()
            assert 0.0 <= float(row[-2]) <= 1.0 and 0.0 <= float(row[-1]) <= 1.0, row
            assert gated in next(l for l in text.splitlines() if "gated model (the run, Eq. 9)" in l)
        if expert == 0:
            assert "has NOT forgotten the forget set" in err and "has NOT forgotten" in readme
        else:
            assert "expert 1 is a forget expert" in readme
    assert export_cli.main(["--run", str(alter_run), "--format", "alter", "--out", str(tmp_path / "a")]) == 0
    assert "WARNING" not in capsys.readouterr().err and not (tmp_path / "a" / "README.md").exists()
    out = tmp_path / "nomeasure"
    assert export_cli.main(["--run", str(alter_run), "--format", "peft", "--expert", "1", "--no-measure", "--out", str(out)]) == 0
    assert "this export (expert 1): not measured (--no-measure)" in capsys.readouterr().err
    assert _tree(alter_run) == before
