"""Collation into numpy batches and forget/retain pairing.

Pairing follows TOFU / open-unlearning: the epoch walks the forget set, and each
forget example is paired with a retain example drawn uniformly at random (TOFU:
``(idx + randint(0, len(retain))) % len(retain)``, open-unlearning:
``randint(0, len(retain))``; both uniform). Here the draw is a seeded numpy generator
keyed by ``(seed, epoch)``, so a run is reproducible and resumable.

All arrays are ``int32[N, T]`` with the keys of :func:`alter_jax.data.prompts.encode_qa`
(``input_ids``, ``attention_mask``, ``labels``); batches keep the static length ``T``.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from alter_jax.data.prompts import PromptFormat, encode_qa_batch

Batch = dict[str, np.ndarray]


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Stack per-example dicts of equal-length arrays into ``[B, T]`` arrays."""
    if not examples:
        raise ValueError("collate needs at least one example")
    keys = list(examples[0].keys())
    lengths = {k: {np.shape(e[k]) for e in examples} for k in keys}
    for k, shapes in lengths.items():
        if len(shapes) != 1:
            raise ValueError(f"collate: field {k!r} has different shapes {sorted(shapes)}; encode with one max_length")
    return {k: np.stack([np.asarray(e[k]) for e in examples]).astype(np.int32) for k in keys}


def encode_rows(
    tokenizer,
    rows: Sequence[Mapping],
    fmt: str | PromptFormat = "auto",
    max_length: int = 256,
    question_key: str = "question",
    answer_key: str = "answer",
) -> Batch:
    """Encode TOFU rows into ``int32[N, max_length]`` arrays (right-padded, masked labels)."""
    return encode_qa_batch(
        tokenizer, [r[question_key] for r in rows], [r[answer_key] for r in rows], fmt, max_length
    )


def take(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> Batch:
    """Rows ``idx`` of every array."""
    return {k: v[idx] for k, v in arrays.items()}


def batch_indices(n: int, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Index batches over ``range(n)`` (seeded shuffle by ``(seed, epoch)``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out = out[:-1]
    return out


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, drop_last: bool = False) -> Iterator[Batch]:
    """Batches of ``arrays`` (dict of ``[N, ...]``)."""
    n = len(next(iter(arrays.values())))
    for idx in batch_indices(n, batch_size, shuffle, seed, epoch, drop_last):
        yield take(arrays, idx)


def pair_forget_retain(n_forget: int, n_retain: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """``int64[n_forget]``: the retain index paired with each forget index (uniform draw)."""
    if n_retain < 1:
        raise ValueError("the retain set is empty; forget/retain pairing needs at least one retain example")
    return np.random.default_rng([seed, epoch, 1]).integers(0, n_retain, size=n_forget)


def forget_retain_batches(
    forget: Mapping[str, np.ndarray],
    retain: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[dict[str, Batch]]:
    """Yield ``{"forget": batch, "retain": batch}``: forget examples in (seeded) order,
    each with its randomly paired retain example at the same batch position."""
    n_f = len(next(iter(forget.values())))
    n_r = len(next(iter(retain.values())))
    partner = pair_forget_retain(n_f, n_r, seed, epoch)
    for idx in batch_indices(n_f, batch_size, shuffle, seed, epoch, drop_last):
        yield {"forget": take(forget, idx), "retain": take(retain, partner[idx])}


def length_sorted_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, pad_multiple: int = 32, left: bool = False
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Batches of token lists, longest first, padded to ``[batch_size, ceil(T / m) * m]``.

    Yields ``(indices, ids int32[B, W], mask int32[B, W])``; padding on the right (scoring) or
    the left (generation); a short last batch is filled with copies of its first row, so the
    jitted model sees few static shapes.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(max(len(sequences[i]) for i in idx), 1)
        width = -(-width // pad_multiple) * pad_multiple
        ids = np.full((batch_size, width), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, width), dtype=np.int32)
        for r in range(batch_size):
            seq = sequences[idx[r] if r < len(idx) else idx[0]]
            if seq:
                sl = slice(width - len(seq), width) if left else slice(0, len(seq))
                ids[r, sl] = seq
                mask[r, sl] = 1
        yield idx, ids, mask
