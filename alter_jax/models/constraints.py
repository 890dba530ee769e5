"""Activation sharding hook: the model marks its activations by *kind*, a caller supplies the layout.

The model (``models/llama.py``) calls :func:`constrain` on a few activations — the residual
stream, the inputs and outputs of column- and row-parallel projections, the logits — naming
each by a kind string. Outside :func:`activation_constraints` this is the identity, so the
model knows nothing about meshes; :mod:`alter_jax.sharding` installs a function that turns a
kind into ``jax.lax.with_sharding_constraint`` from its rules (``ACTIVATION_RULES``, data like
the parameter rules). The hook is read while a function is traced, so it must be active when a
jitted step is first called, lowered or exported.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

#: ``(array, kind) -> array`` while a layout is installed, else ``None``.
_CONSTRAIN: contextvars.ContextVar[Callable[[jax.Array, str], jax.Array] | None] = contextvars.ContextVar(
    "alter_jax_activation_constraint", default=None)

#: The kinds the model marks (``models/llama.py``).
KINDS = ("residual", "col_in", "col_out", "row_in", "row_out", "logits")


def active() -> bool:
    """Whether a layout is installed (a sharded step is being traced)."""
    return _CONSTRAIN.get() is not None


def constrain(x: Any, kind: str) -> Any:
    """``x`` laid out as the installed layout says for ``kind`` (identity when none is installed)."""
    fn = _CONSTRAIN.get()
    return x if fn is None else fn(x, kind)


@contextlib.contextmanager
def activation_constraints(fn: Callable[[jax.Array, str], jax.Array] | None) -> Iterator[None]:
    """Install ``fn`` as the layout of :func:`constrain` for the duration of the block."""
    token = _CONSTRAIN.set(fn)
    try:
        yield
    finally:
        _CONSTRAIN.reset(token)
