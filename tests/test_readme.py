"""issue 14: the README must work when pasted. Its Python snippet runs as written; its quick-start
``bin/unlearn`` lines parse and validate; with --runslow the demo lines run as pasted and change the model."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _quick_start_lines() -> list[str]:
    quick = README.split("## Quick start", 1)[1]
    text = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0]
    text = text.replace("\\\n", " ")
    return [l.split("  #")[0].strip() for l in text.splitlines() if l.strip()]


def test_readme_python_snippet_runs_as_written():
    (snippet,) = _blocks("python")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(snippet, "README.md", "exec"), {})
    printed = buf.getvalue().strip()
    assert printed and "Traceback" not in printed, printed


def test_readme_unlearn_lines_parse_and_validate():
    from alter_jax.cli import unlearn as unlearn_cli
    from alter_jax.cli.common import build_run_config, split_overrides

    lines = [l for l in _quick_start_lines() if l.startswith("bin/unlearn")]
    assert len(lines) >= 3
    for line in lines:
        rest, ov = split_overrides(shlex.split(line)[1:])
        args = unlearn_cli.parser().parse_args(rest)
        run = build_run_config(REPO / args.config, ov)
        if "lora_gd" in line:  # issue 14: at the default lr 1e-5 plain LoRA changed nothing on the demo
            assert run.optim.lr >= 1e-4, line


@pytest.mark.slow
def test_readme_demo_lines_run_as_pasted_and_change_the_model(tmp_path):
    for name in ("bin", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    for line in [l for l in _quick_start_lines() if l.startswith("bin/unlearn --config configs/demo.py")]:
        proc = subprocess.run([sys.executable, *shlex.split(line), "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        out = re.search(r"--config\.output_dir=(\S+)", line)
        report = json.loads((tmp_path / (out.group(1) if out else "runs/demo") / "report.json").read_text())
        b, a = report["before"]["forget"]["answer_prob"], report["after"]["forget"]["answer_prob"]
        assert a < 0.5 * b, (line, b, a)  # the line does what the README says: the model forgets
