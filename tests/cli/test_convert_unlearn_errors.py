"""issue 14, "errors a user cannot act on": bin/convert and bin/unlearn refuse early, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alter_jax.cli import convert as convert_cli
from alter_jax.cli import unlearn as unlearn_cli
from alter_jax.cli.common import split_overrides


def test_convert_into_a_non_empty_folder_is_refused_before_converting(tmp_path, capsys):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"not read: the output is checked first")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert_cli.main([str(src), str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"output folder {out} is not empty and was not written by bin/convert" in err, err
    assert "nothing was converted" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    f = tmp_path / "file"
    f.write_text("x")
    assert convert_cli.main([str(src), str(f), "-q"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err and f.read_text() == "x"


def test_config_override_with_a_space_is_accepted():
    """``--config.optim.lr_b 5e-4`` failed with 'unrecognized arguments'."""
    rest, ov = split_overrides(["--config", "c.py", "--config.optim.lr_b", "5e-4", "--dry-run", "--config.train.seed=3"])
    assert rest == ["--config", "c.py", "--dry-run"] and ov == ["config.optim.lr_b=5e-4", "config.train.seed=3"]
    with pytest.raises(SystemExit):  # a key with no value at the end still says how to write it
        split_overrides(["--config.optim.lr_b"])


def test_rerun_with_changed_config_names_the_keys(tmp_path, capsys):
    from alter_jax.cli.common import build_run_config
    from alter_jax.train.loop import RunConflict, config_snapshot, unlearn

    out = tmp_path / "r"
    out.mkdir()
    first = build_run_config(Path(unlearn_cli.DEFAULT_CONFIG), [f"config.output_dir={out}"])
    (out / "config.json").write_text(json.dumps(config_snapshot(first)))
    second = build_run_config(Path(unlearn_cli.DEFAULT_CONFIG), [f"config.output_dir={out}", "config.optim.lr_b=5e-4",
                                                                  "config.train.epochs=2"])
    with pytest.raises(RunConflict, match=r"different config: optim\.lr_b \(0\.001 there, 0\.0005 now\), train\.epochs "
                                          r"\(3 there, 2 now\)"):
        unlearn(second, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]


def test_missing_model_path_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        unlearn_cli.main(["--no-progress", f"--config.model.name={tmp_path / 'models' / 'nosuch'}",
                          f"--config.output_dir={out}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nosuch" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_mistyped_relative_folder_is_named_without_a_hub_lookup(tmp_path, monkeypatch):
    """``models/smolm2`` was taken for a hub id (owner/name) and the user waited through hub retries."""
    import time

    from alter_jax.models import registry

    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_snapshot", lambda *a, **k: pytest.fail("the hub was asked"))
    t = time.perf_counter()
    with pytest.raises(registry.ModelResolutionError,
                       match=r"no folder 'models/smolm2' here \(models/ is a local folder.*did you mean models/smollm2\?"):
        registry.locate_model("models/smolm2")
    assert time.perf_counter() - t < 2


def test_hub_failure_says_there_is_no_local_folder_either(monkeypatch):
    from alter_jax.models import registry

    def down(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files. Check your connection or see the offline mode docs for look-ups and more")

    monkeypatch.setattr(registry, "_snapshot", down)
    with pytest.raises(registry.ModelResolutionError) as e:
        registry.locate_model("someone/somemodel")
    msg = str(e.value)
    assert msg.startswith("no local folder 'someone/somemodel' exists, and hub model 'someone/somemodel' could not be "
                          "fetched"), msg
    assert "look-ups a." not in msg and " [...]" in msg or "look-ups and more" in msg  # never cut mid-word
