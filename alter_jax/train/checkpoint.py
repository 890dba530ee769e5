"""Run checkpoints: Orbax for the train state, JSON for the data position; atomic writes.

A checkpoint holds the train state's array leaves (adapters or trainable backbone,
optimizer state, step) under ``state`` and a JSON ``meta`` (phase, epoch, batch index
within the epoch, the RNG seed, the config hash). The state is saved as its flat list of
leaves and restored into the tree structure of a freshly initialised state, so nnx and
optax containers never need to be serialised themselves.

Orbax writes into a temporary folder and renames it on completion, so a killed run
never leaves a half-written checkpoint that looks complete. A checkpoint that exists but
cannot be read raises :class:`CheckpointCorrupt` naming the folder: it is never skipped
silently.

Multi-process runs: every process calls :meth:`RunCheckpointer.save` on the same (shared) folder;
leaves sharded over several processes are passed to Orbax as ``jax.Array`` so that each process
writes its own shards, and process 0 finalises the step. :meth:`RunCheckpointer.restore` reads
whole arrays on every process, so a checkpoint restores on any number of processes and any mesh
(``tests/multihost``: written by 2 processes, restored bitwise in 1).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointCorrupt(RuntimeError):
    """A checkpoint folder that exists but cannot be restored."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; honour the user's umask
    os.replace(tmp, path)


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunCheckpointer:
    """Save / restore ``(state pytree, meta dict)`` under ``<run>/checkpoints``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        leaves = {f"{i:05d}": _saveable(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """Restore the latest (or given) step into ``template``'s structure; None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        leaves, treedef = jax.tree_util.tree_flatten(template)
        target = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        path = self.directory / str(step)
        _quiet_closed_event_loops()  # a failed restore's orbax threads report "Event loop is closed"
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax raises several types for damaged folders
            reason = " ".join(str(e).split())
            reason = reason if len(reason) <= 200 else reason[:200].rsplit(" ", 1)[0] + " ..."
            _quiet_orphaned_restore_tasks(path)
            earlier = [s for s in self.manager.all_steps() if s < step]
            fix = (f"delete {path} and rerun the same command to resume from step {max(earlier)} (the previous "
                   f"checkpoint, {self.directory / str(max(earlier))})" if earlier else
                   f"delete {path} and rerun the same command to start again from step 0")
            raise CheckpointCorrupt(
                f"checkpoint {path} cannot be restored (step {step}; {type(e).__name__}: {reason}): {fix}, or start "
                "the run in a new output_dir."
            ) from None
        restored = out["state"]
        if sorted(restored) != sorted(target):
            raise CheckpointCorrupt(f"checkpoint {path} holds {len(restored)} arrays, the run expects {len(target)}.")
        new_leaves = [jax.numpy.asarray(restored[k], dtype=np.asarray(x).dtype) for k, x in zip(sorted(target), leaves)]
        return jax.tree_util.tree_unflatten(treedef, new_leaves), dict(out["meta"]), step


def _saveable(x: Any) -> Any:
    """A leaf as Orbax should write it: host arrays as numpy; an array sharded over several processes
    stays a ``jax.Array``, so that every process writes its own shards (Orbax multi-host: all
    processes call ``save`` on a folder they share; process 0 finalises it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    return np.asarray(x)


class _OrphanedReadTasks(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records for the damaged checkpoint's
    reads (orbax leaves both kinds: tasks for the parallel reads, bare futures for tensorstore's)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        orphaned = msg.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
        return not (orphaned and self.folder in msg)


def _quiet_orphaned_restore_tasks(folder: Path) -> None:
    """After a failed restore, the reads orbax started in parallel still fail one by one; asyncio logs
    each of them with a traceback when its task is collected (at exit on a slow machine), after the
    caller's one-line report. Those records, and only those naming ``folder``, are dropped."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedReadTasks) and f.folder == str(folder) for f in log.filters):
        log.addFilter(_OrphanedReadTasks(str(folder)))


def _quiet_closed_event_loops() -> None:
    """Drop the "Event loop is closed" RuntimeErrors that orbax's background threads raise after a
    failed (damaged-checkpoint) restore, from both the thread and the unraisable hooks; every other
    exception is reported as before. The caller reports the damaged checkpoint in one line."""
    import sys
    import threading

    def closed(exc) -> bool:
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    prev_thread, prev_unraisable = threading.excepthook, sys.unraisablehook
    if getattr(prev_thread, "_alter_quiet", False):
        return

    def thread_hook(args):
        if not closed(args.exc_value):
            prev_thread(args)

    def unraisable_hook(u):
        if not closed(u.exc_value):
            prev_unraisable(u)

    thread_hook._alter_quiet = True
    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
