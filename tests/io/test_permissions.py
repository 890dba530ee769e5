"""issue 14: run files were written 0600 in 0700 folders despite umask 022."""

from __future__ import annotations

import os
import stat

import pytest

from alter_jax.io.hf import atomic_dir
from alter_jax.train.checkpoint import write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "report.json", {"a": 1})
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "w.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "adapter" / "w.bin").stat().st_mode) == 0o666 & ~umask
