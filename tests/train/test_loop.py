"""The unlearning run end to end: demo, resume (bitwise), real TOFU data, bad configs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from alter_jax import config as C
from alter_jax.cli.common import load_config_file, with_defaults
from alter_jax.train.loop import unlearn

REPO = Path(__file__).resolve().parents[2]


def demo_run(tmp_path, **sections) -> C.RunConfig:
    run = C.build(with_defaults(load_config_file(REPO / "configs" / "demo.py")))
    repl = {k: dataclasses.replace(getattr(run, k), **v) for k, v in sections.items()}
    return dataclasses.replace(run, output_dir=str(tmp_path), **repl)


def test_demo_forgets_and_keeps(tmp_path):
    report = unlearn(demo_run(tmp_path / "demo"), progress=False, log=lambda *_: None)
    b, a = report["before"], report["after"]
    assert b["forget"]["answer_prob"] > 0.9  # the demo model knows the authors
    assert a["forget"]["answer_prob"] < 0.5 * b["forget"]["answer_prob"]
    assert a["retain"]["answer_prob"] > 0.9 * b["retain"]["answer_prob"]
    assert report["warnings"] == []
    out = tmp_path / "demo"
    for f in ("report.json", "metrics.jsonl", "config.json", "plots/loss.png", "plots/entropy_hist.png",
              "adapter/alter_adapter.safetensors"):
        assert (out / f).exists(), f


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    sections = dict(train={"max_steps": 6, "checkpoint_every": 2, "epochs": 1},
                    eval={"num_questions": 4, "max_new_tokens": 4, "batch_size": 4})
    straight = demo_run(tmp_path / "straight", **sections)
    unlearn(straight, progress=False, log=lambda *_: None)

    broken = demo_run(tmp_path / "broken", **sections)
    with pytest.raises(KeyboardInterrupt):
        unlearn(broken, progress=False, log=lambda *_: None, interrupt_after_step=3)
    assert not (tmp_path / "broken" / "report.json").exists()
    logs = []
    report = unlearn(broken, progress=False, log=logs.append)  # the same command again
    assert any("resumed from" in str(l) and "step 2" in str(l) for l in logs), logs
    assert report["steps"] == 6
    a = load_file(tmp_path / "straight" / "adapter" / "alter_adapter.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "alter_adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    steps = [json.loads(l)["step"] for l in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # metrics of the lost step 3 were replaced, not duplicated


def test_corrupt_checkpoint_is_reported(tmp_path):
    from alter_jax.train.checkpoint import CheckpointCorrupt

    sections = dict(train={"max_steps": 2, "checkpoint_every": 2, "epochs": 1},
                    eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2})
    run = demo_run(tmp_path / "r", **sections)
    with pytest.raises(KeyboardInterrupt):
        unlearn(run, progress=False, log=lambda *_: None, interrupt_after_step=2)
    for f in (tmp_path / "r" / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints/2 cannot be restored"):
        unlearn(run, progress=False, log=lambda *_: None)


def test_failed_restore_silences_only_its_own_orphaned_reads(tmp_path, caplog):
    """On a slow machine orbax's parallel reads of a damaged checkpoint fail after the one-line report and
    asyncio logged each with a traceback (seen in CI beside a busy study). Those records are dropped once a
    restore of that folder failed; an orphaned task about anything else is still logged."""
    import asyncio
    import gc

    from alter_jax.train.checkpoint import CheckpointCorrupt, RunCheckpointer

    ck = RunCheckpointer(tmp_path / "ck")
    ck.save(1, {"w": np.ones((4, 4), np.float32)}, {"phase": "main"})
    for f in (tmp_path / "ck" / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointCorrupt):
        ck.restore({"w": np.zeros((4, 4), np.float32)})

    def orphan(message: str) -> None:
        async def read():
            raise ValueError(message)

        loop = asyncio.new_event_loop()
        task = loop.create_task(read())
        loop.run_until_complete(asyncio.sleep(0.01))
        del task
        gc.collect()
        loop.close()

    caplog.clear()
    with caplog.at_level("ERROR", logger="asyncio"):
        orphan(f'OUT_OF_RANGE: Error reading "00014/0.0" at local file "{tmp_path / "ck" / "1"}/state/"')
        assert not [r for r in caplog.records if r.name == "asyncio"]
        orphan("an unrelated failure")
    assert [r for r in caplog.records if "an unrelated failure" in r.getMessage()]


def test_rerun_with_other_config_is_refused(tmp_path):
    from alter_jax.train.loop import RunConflict

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"hash": "something-else"}))
    with pytest.raises(RunConflict, match="different config"):
        unlearn(demo_run(tmp_path / "r"), progress=False, log=lambda *_: None)


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lr_bb=1", "unknown config key config.optim.lr_bb; valid keys here: clip_norm"),
    ("--config.optim.lr_b=fast", "expected float"),
    ("--config.train.method=magic", "choose one of alter, asymlora"),
    ("--config.entropy.threshold=otsu", "choose one of 'fixed', 'quantile', 'bimodal'"),
    ("--config.nosuch.key=1", "unknown config key config.nosuch"),
])
def test_bad_config_fails_before_work_with_choices(override, message):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "unlearn"), override], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_plan_without_weights(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "unlearn"), "--config", str(REPO / "configs" / "tofu_10.py"),
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["param_counts"]["backbone"] == 6_738_415_616  # Llama-2-7b
    assert set(plan["trainable"]) == {"shared_a", "retain_expert", "forget_experts", "router"}


def test_text_corpora_each_corpus_is_a_subdomain(tmp_path):
    from alter_jax.data.synthetic import generate_authors

    rows = generate_authors(6, seed=1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, chunk in (("bio", rows[:20]), ("cyber", rows[20:40]), ("retain", rows[40:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["answer"]}) + "\n" for r in chunk))
    run = demo_run(tmp_path / "run", data={"kind": "text", "source": str(folder), "forget_split": "bio,cyber",
                                            "retain_split": "retain", "num_subdomains": 0},
                   train={"max_steps": 2, "epochs": 1}, model={"max_length": 48},
                   eval={"num_questions": 4, "batch_size": 4})
    report = unlearn(run, progress=False, log=lambda *_: None)
    assert report["data"]["subdomains"]["source"] == "labels"
    assert report["data"]["num_forget_experts"] == 2
    assert report["steps"] == 2 and np.isfinite(report["after"]["forget"]["answer_prob"])


def test_rmu_run_changes_only_the_steered_mlp_kernels(tmp_path):
    from alter_jax.demo import ensure_demo_model

    run = demo_run(tmp_path / "rmu", train={"method": "rmu"}, loss={"rmu_layer": 1}, optim={"lr": 1e-3})
    report = unlearn(run, progress=False, log=lambda *_: None)
    b, a = report["before"], report["after"]
    assert a["forget"]["answer_prob"] < 0.5 * b["forget"]["answer_prob"]  # 0.99 -> 0.15 here
    assert a["retain"]["rouge_l_recall"] > 0.9  # retained answers still generated (0.99 here)
    assert report["trainable_params"] == {"backbone": 2 * 256 * 128}  # down_proj [256, 128] of layers 0 and 1
    new = load_file(tmp_path / "rmu" / "model" / "model.safetensors")
    old = load_file(ensure_demo_model(progress=False) / "model.safetensors")
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_rmu_dry_run_counts_only_the_steered_kernels():
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "unlearn"), "--config", str(REPO / "configs" / "tofu_10.py"),
                           "--config.train.method=rmu", "--dry-run", "--json"], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["trainable"] == {"backbone": 3 * 11008 * 4096}  # down_proj of layers 5, 6, 7 of Llama-2-7b


def test_rmu_layer_beyond_the_model_is_named_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "unlearn"), "--config", str(REPO / "configs" / "demo.py"),
                           "--config.train.method=rmu", f"--config.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "config.loss.rmu_layer = 7: the model has 2 decoder layers; choose 0..1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """issue 14: at lr 1e38 the loss is NaN from step 2; the run used to finish (exit 0) with an all-NaN
    adapter and a bare NaN in report.json. Now: exit 3, one line naming the step and the cause, no result."""
    import orbax.checkpoint as ocp

    from alter_jax.cli import unlearn as unlearn_cli

    out = tmp_path / "div"
    argv = ["--no-progress", "--config.optim.lr_b=1e38", "--config.optim.lr_a=1e38", "--config.optim.lr_router=1e38",
            "--config.train.max_steps=4", "--config.train.checkpoint_every=1", "--config.eval.num_questions=2",
            "--config.eval.max_new_tokens=2", f"--config.output_dir={out}"]
    with pytest.raises(SystemExit) as e:
        unlearn_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 3, err
    assert "training diverged: step 2 (main) gave a non-finite loss = nan, grad_norm = nan" in err, err
    assert "learning rate too high" in err and "config.optim.clip_norm" in err, err
    assert f"last good checkpoint {out / 'checkpoints' / '1'} is kept" in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert not (out / "adapter").exists() and not (out / "report.json").exists()  # no non-finite result
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    leaves = ocp.StandardCheckpointer().restore((out / "checkpoints" / "1" / "state").absolute())
    assert leaves and all(np.all(np.isfinite(np.asarray(v))) for v in leaves.values())  # the kept one is finite

    def strict(c):
        raise ValueError(c)

    rows = [json.loads(l, parse_constant=strict) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # strict JSON: the NaN step is not logged


def test_non_finite_adapter_is_never_saved_or_loaded(tmp_path):
    from alter_jax.adapters.inject import adapted_layers
    from alter_jax.io.alter import AdapterCheckpointError, load_alter_adapter, save_alter_adapter
    from tests.train.conftest import tiny_model

    model = tiny_model()
    save_alter_adapter(model, tmp_path / "ok")
    lin = next(iter(adapted_layers(model).values()))
    lin.adapter.retain_expert[...] = lin.adapter.retain_expert[...] * np.nan
    with pytest.raises(ValueError, match=r"1 tensor\(s\) hold NaN or inf .*retain_expert.*never saved"):
        save_alter_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a NaN adapter written by an older version is refused on load, naming the file
    from safetensors.numpy import load_file, save_file

    w = tmp_path / "ok" / "alter_adapter.safetensors"
    t = load_file(w)
    k = sorted(t)[0]
    t[k] = np.full_like(t[k], np.inf)
    save_file(t, str(w), metadata={"format": "alter-adapter", "format_version": "1"})
    with pytest.raises(AdapterCheckpointError, match=rf"{w}: 1 tensor\(s\) hold NaN or inf .*{k}.*diverged"):
        load_alter_adapter(tiny_model(None), tmp_path / "ok")


@pytest.mark.parametrize("override, message", [
    ("--config.adapter.rank=0", "config.adapter.rank = 0; it must be >= 1"),
    ("--config.train.checkpoint_every=0", "config.train.checkpoint_every = 0; it must be >= 1"),
    ("--config.train.epochs=0", "config.train.epochs = 0; it must be >= 1 (epochs 0 would save the untrained adapter"),
    ("--config.train.batch_size=0", "config.train.batch_size = 0; it must be >= 1"),
    ("--config.optim.lr_b=-1e-3", "config.optim.lr_b = -0.001; a learning rate must be a finite number > 0"),
    ("--config.optim.lr_b=0", "config.optim.lr_b = 0: method 'alter' trains with it"),
    ("--config.entropy.q=0", "config.entropy.q = 0.0; it must be > 0"),
    ("--config.entropy.value=1.5", "config.entropy.value = 1.5 with threshold 'quantile'"),
    ("--config.data.num_subdomains=-1", "config.data.num_subdomains = -1; it must be >= 0"),
])
def test_dry_run_refuses_values_out_of_range(override, message, tmp_path, capsys):
    """issue 14: --dry-run printed a plan for rank 0 and a negative lr; epochs 0 / checkpoint_every 0 crashed late."""
    from alter_jax.cli import unlearn as unlearn_cli

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        unlearn_cli.main(["--dry-run", override, f"--config.output_dir={out}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unreachable_fixed_theta_and_too_many_subdomains_are_refused_in_validation(capsys):
    from alter_jax.cli import unlearn as unlearn_cli

    for argv, message in (
        (["--config.entropy.threshold=fixed", "--config.entropy.value=1.2", "--config.entropy.q=2"],
         "θ = 1.2 is unreachable with config.entropy.q = 2"),
        (["--config.data.num_forget=3", "--config.data.num_subdomains=5"],
         "config.data.num_subdomains = 5 exceeds config.data.num_forget = 3"),
    ):
        with pytest.raises(SystemExit) as e:
            unlearn_cli.main(["--dry-run", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--config.entropy.threshold=fixed", "--config.entropy.value=1.2"],
     r"config\.entropy: θ = 1\.2 sits at the 100\.0 % quantile of the \d+ answer-token entropies S_1 .* so no token is "
     r"high-entropy and method 'alter' needs both sets\. Choose another threshold: --config\.entropy\.threshold=quantile"),
    (["--config.adapter.target_modules=q_prj"], r"config\.adapter\.target_modules \['q_prj'\] match no layer"),
    (["--config.data.num_subdomains=100"], r"config\.data\.num_subdomains = 100 exceeds the \d+ forget rows of 'forget25'"),
])
def test_run_checks_fail_before_the_first_expensive_step(argv, message, tmp_path, capsys):
    """issue 14: θ = 1.2 left 0 % of the demo's tokens high-entropy without a word; a bad target module or
    too many sub-domains failed with a traceback after the 12 s "before" evaluation."""
    import re

    from alter_jax.cli import unlearn as unlearn_cli

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        unlearn_cli.main(["--no-progress", *argv, f"--config.output_dir={out}"])
    cap = capsys.readouterr()
    assert e.value.code == 2 and re.search(message, cap.err) and "Traceback" not in cap.err, cap.err
    assert cap.err.count("\n") == 1, cap.err
    assert "before" not in cap.out  # refused before the "before" evaluation
    assert not (out / "checkpoints").exists() and not (out / "report.json").exists()


def test_entropy_prepass_reports_the_high_entropy_fraction(tmp_path):
    import time

    logs = []
    run = demo_run(tmp_path / "r", train={"max_steps": 1, "epochs": 1},
                   eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 2})
    first = unlearn(run, progress=False, log=logs.append)
    line = next(str(l) for l in logs if str(l).startswith("entropy: θ = "))
    info = json.loads((tmp_path / "r" / "data_info.json").read_text())
    assert f"high-entropy answer tokens {100 * info['high_entropy_fraction']:.1f} %" in line
    assert 0.25 < info["high_entropy_fraction"] < 0.35  # the demo's quantile threshold: top 30 %
    # issue 14: re-running a finished run took 47 s to say it was finished
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file() and p.name != ".lock"}
    logs.clear()
    t = time.perf_counter()
    again = unlearn(run, progress=False, log=logs.append)
    assert time.perf_counter() - t < 2 and again == first
    assert len(logs) == 1 and "holds a finished run with this config" in logs[0] and "nothing to do" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file() and p.name != ".lock"} == before


def _demo_data_copy(dst: Path) -> Path:
    import shutil

    from alter_jax.demo import ensure_demo_model

    shutil.copytree(ensure_demo_model(progress=False).parent / "data", dst)
    return dst


def test_unlearn_refuses_empty_answers_and_cut_answers(tmp_path, capsys):
    """issue 14: empty answers and answers cut by max_length were trained and scored without a word."""
    from alter_jax.cli import unlearn as unlearn_cli

    data = _demo_data_copy(tmp_path / "data")
    f = data / "forget25.json"
    text = f.read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    rows[3]["answer"] = ""
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = (([f"--config.data.source={data}"], f"{f}, row 3: field 'answer' is empty"),
             (["--config.model.max_length=40"],
              r"config.model.max_length = 40 cuts the answers of \d+ of \d+ forget rows \(\d+\.\d %.* more than 2 % is "
              r"refused: raise max_length, or pass --config.data.allow_truncation=True"))
    import re

    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"r{i}"
        with pytest.raises(SystemExit) as e:
            unlearn_cli.main(["--no-progress", *argv, f"--config.output_dir={out}"])
        cap = capsys.readouterr()
        assert e.value.code == 2 and re.search(message if i else re.escape(message), cap.err), cap.err
        assert "Traceback" not in cap.err and cap.err.count("\n") == 1, cap.err
        assert "before" not in cap.out and not (out / "checkpoints").exists()
    assert json.loads(f.read_text().splitlines()[3])["answer"] == ""  # the user's file is untouched


def test_truncation_is_counted_and_allowed_only_on_request():
    from alter_jax.demo import ensure_demo_model
    from alter_jax.io.hf import load_tokenizer
    from alter_jax.train.loop import check_truncation, load_rows
    from alter_jax.train.prepare import encode

    run = C.build(with_defaults(load_config_file(REPO / "configs" / "demo.py")))
    tok = load_tokenizer(ensure_demo_model(progress=False))
    rows = dict(zip(("forget", "retain"), load_rows(run.data, Path("unused"))))
    arrays = {s: encode(tok, rows[s], "llama2", 96) for s in rows}
    assert check_truncation(run, rows, arrays, tok.eos_token_id, print) == {"forget": 0, "retain": 0}
    arrays = {s: encode(tok, rows[s], "llama2", 40) for s in rows}
    allowed = dataclasses.replace(run, data=dataclasses.replace(run.data, allow_truncation=True),
                                  model=dataclasses.replace(run.model, max_length=40))
    logs = []
    counts = check_truncation(allowed, rows, arrays, tok.eos_token_id, logs.append)
    assert counts["forget"] > 0 and len(logs) == sum(1 for v in counts.values() if v)
    assert logs[0].startswith(f"warning: config.model.max_length = 40 cuts the answers of {counts['forget']} of "
                              f"{len(rows['forget'])} forget rows")
    with pytest.raises(C.ConfigValueError, match="more than 2 % is refused"):
        check_truncation(dataclasses.replace(allowed, data=run.data), rows, arrays, tok.eos_token_id, logs.append)


def test_a_second_run_into_the_same_folder_is_refused_with_the_holders_pid(tmp_path, capsys):
    """issue 14: two runs into one output_dir interleaved metrics.jsonl."""
    from alter_jax.cli import unlearn as unlearn_cli

    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pathlib import Path; from alter_jax.train.loop import run_lock\n"
                               "with run_lock(Path(sys.argv[2])):\n print('held', flush=True); time.sleep(60)",
                               str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            unlearn_cli.main(["--no-progress", f"--config.output_dir={out}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{out} is in use by another run (PID {holder.pid})" in err, err
        assert "Traceback" not in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]  # nothing written, nothing lost
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    finally:
        holder.kill()
        holder.wait()
    from alter_jax.train.loop import run_lock

    with run_lock(out):  # kill -9 of the holder released it
        assert (out / ".lock").read_text().strip() == str(__import__("os").getpid())


def test_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
    import os

    from alter_jax.cli import unlearn as unlearn_cli

    f = tmp_path / "file"
    f.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        cases = [(f, "is a file, not a folder")]
        if os.geteuid() != 0:
            cases.append((ro / "run", "cannot be written (Permission denied"))
        else:  # root writes into read-only folders; /sys refuses new entries to everyone
            cases.append((Path("/sys/alter_jax_test/run"), "cannot be written (Operation not permitted"))
        for out, message in cases:
            with pytest.raises(SystemExit) as e:
                unlearn_cli.main(["--no-progress", f"--config.output_dir={out}"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
        assert f.read_text() == "x"
    finally:
        os.chmod(ro, 0o700)


def test_corrupt_checkpoint_is_one_line_naming_the_step_and_the_previous_one(tmp_path, capsys):
    """issue 14: a truncated checkpoint's message was buried under asyncio tracebacks."""
    from alter_jax.cli import unlearn as unlearn_cli

    out = tmp_path / "r"
    argv = ["--no-progress", "--config.train.max_steps=3", "--config.train.checkpoint_every=1", "--config.train.epochs=1",
            "--config.eval.num_questions=2", "--config.eval.max_new_tokens=2", "--config.eval.batch_size=2",
            f"--config.output_dir={out}"]
    from alter_jax.cli.common import build_run_config, split_overrides

    rest, ov = split_overrides(argv)
    with pytest.raises(KeyboardInterrupt):
        unlearn(build_run_config(REPO / "configs" / "demo.py", ov), progress=False, log=lambda *_: None,
                interrupt_after_step=2)
    data = [f for f in (out / "checkpoints" / "2" / "state").rglob("*") if f.is_file() and "ocdbt.process" in str(f)
            and f.parent.name == "d"]
    assert data
    for f in data:  # truncated files, as after a full disk
        f.write_bytes(f.read_bytes()[:10])
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "unlearn"), *argv], capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err and "Event loop" not in err and err.count("\n") == 1, err
    ck = out / "checkpoints"
    assert f"checkpoint {ck / '2'} cannot be restored (step 2; " in err, err
    assert f"delete {ck / '2'} and rerun the same command to resume from step 1 (the previous checkpoint" in err, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing deleted for the user


def test_a_destroyed_but_finite_result_is_reported(tmp_path):
    """issue 14: at lr 1e6 the run saved a model of uniform noise without a word (measured: retain prob
    0.99 -> 0.001)."""
    logs = []
    report = unlearn(demo_run(tmp_path / "r", optim={"lr_b": 1e6, "lr_a": 1e6, "lr_router": 1e6},
                              train={"max_steps": 6, "epochs": 1},
                              eval={"num_questions": 8, "max_new_tokens": 2, "batch_size": 8}),
                     progress=False, log=logs.append)
    (w,) = report["warnings"]
    assert w.startswith("retain answer prob fell from") and "(below half)" in w and "learning rate too high" in w
    assert f"warning: {w}" in logs
    assert json.loads((tmp_path / "r" / "report.json").read_text())["warnings"] == [w]


def test_a_learning_rate_sweep_reuses_one_compiled_step_with_each_runs_own_rate(tmp_path):
    """A study's sweep in one process: runs that differ only in learning rate share the jitted step
    (the rates are optimizer state), yet each trains with its own rate, bitwise as a fresh process."""
    from alter_jax.train import step as S

    sections = dict(train={"max_steps": 3, "epochs": 1}, eval={"num_questions": 2, "max_new_tokens": 2, "batch_size": 4})

    def adapter(name, lr_b, clear):
        if clear:
            S._REUSED_STEPS.clear()
        unlearn(demo_run(tmp_path / name, optim={"lr_b": lr_b}, **sections), progress=False, log=lambda *_: None)
        return load_file(tmp_path / name / "adapter" / "alter_adapter.safetensors")

    a = adapter("a", 1e-3, True)
    steps = dict(S._REUSED_STEPS)
    traced = {k: f._cache_size() for k, f in steps.items()}
    assert len(steps) >= 1  # the main step (and phase I where the config runs it)
    b = adapter("b", 3e-3, False)
    assert S._REUSED_STEPS == steps  # the same jitted objects ...
    assert {k: f._cache_size() for k, f in steps.items()} == traced  # ... and no new trace or compile
    b_fresh = adapter("b_fresh", 3e-3, True)
    assert a.keys() == b.keys() == b_fresh.keys()
    for k in b:
        np.testing.assert_array_equal(b[k], b_fresh[k])
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # the second run used its own rate
