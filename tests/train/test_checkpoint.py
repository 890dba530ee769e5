"""The damaged-restore quieting in ``alter_jax/train/checkpoint.py``: only the orphaned reads of the
damaged folder are dropped; everything else asyncio logs still reaches the user."""
import logging

from alter_jax.train.checkpoint import _OrphanedReadTasks


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)


def test_orphaned_task_and_future_records_of_the_damaged_folder_are_dropped():
    """CI (stop 26) showed orbax leaving bare futures as well as tasks after a truncated checkpoint."""
    f = _OrphanedReadTasks("/run/checkpoints/2")
    for kind in ("Task", "Future"):
        damaged = f"{kind} exception was never retrieved\nfuture: <{kind} finished exception=ValueError('OUT_OF_RANGE: " \
                  "Error reading \"00151/0.0\" in OCDBT database at local file \"/run/checkpoints/2/state/\"')>"
        assert not f.filter(_record(damaged)), kind
        other = damaged.replace("/run/checkpoints/2", "/elsewhere/3")
        assert f.filter(_record(other)), kind
    assert f.filter(_record("Unclosed client session"))
    assert f.filter(_record("Future exception was never retrieved (no folder named)"))
