"""GradNorm membership-inference statistic for our NNX model: the :data:`alter_jax.eval.mia.GradNormFn`.

open-unlearning's ``GradNormAttack`` back-propagates ``ℓ = −mean_t log p(x_t | x_<t)`` of one
example (batch size 1) and scores it by the mean, over the model's parameter tensors that
receive a gradient, of the tensor's p-norm (p = 2). Their evaluated models are full Hugging
Face models, so every weight counts. Here the parameters are the backbone's ``nnx.Param``
(adapter variables are ``AdapterParam``, not ``nnx.Param``): for a plain-LoRA model this is
the gradient w.r.t. the merged weights (∂ℓ/∂W is the same for ``W x + B A x`` and for
``(W + B A) x``); for ALTER pass the gated forward as ``forward``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.data.prompts import IGNORE_INDEX


def _pnorm(x, p: float):
    x = jnp.abs(x.astype(jnp.float32))
    if p == float("inf"):
        return jnp.max(x)
    if p == 1:
        return jnp.sum(x)
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def model_gradnorm_fn(model, p: float = 2.0, forward: Callable | None = None, wrt=nnx.Param):
    """GradNormFn of ``model``: rows are differentiated one at a time (as open-unlearning's
    batch size 1). ``forward(model, ids, mask) -> logits`` defaults to ``model(ids, mask)``;
    ``wrt`` is the NNX filter of the differentiated parameters (default the backbone's)."""
    if p not in (1, 2, float("inf")):
        raise ValueError(f"gradnorm: p must be 1, 2 or inf (open-unlearning's choices), got {p}")
    graphdef, params, rest = nnx.split(model, wrt, ...)
    fwd = forward or (lambda m, ids, mask: m(ids, mask))

    @jax.jit
    def one(params, rest, ids, mask, labels):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            lg = fwd(m, ids, mask)[:, :-1].astype(jnp.float32)
            tgt = labels[:, 1:]
            valid = tgt != IGNORE_INDEX
            lp = jax.nn.log_softmax(lg, axis=-1)
            tok = jnp.take_along_axis(lp, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
            return -(tok * valid).sum() / jnp.maximum(valid.sum(), 1)

        grads = jax.grad(loss)(params)
        norms = [_pnorm(g, p) for g in jax.tree.leaves(grads)]
        return jnp.mean(jnp.stack(norms))

    def gradnorm_fn(input_ids, attention_mask, labels) -> np.ndarray:
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.asarray(attention_mask, jnp.int32)
        lab = jnp.asarray(labels, jnp.int32)
        return np.array([float(one(params, rest, ids[i:i + 1], mask[i:i + 1], lab[i:i + 1]))
                         for i in range(ids.shape[0])], dtype=np.float64)

    return gradnorm_fn
