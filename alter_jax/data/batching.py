"""Collation into numpy batches and forget/retain pairing.

Pairing follows TOFU / open-unlearning: the epoch walks the forget set, and each
forget example is paired with a retain example drawn uniformly at random (TOFU:
``(idx + randint(0, len(retain))) % len(retain)``, open-unlearning:
``randint(0, len(retain))``; both uniform). Here the draw is a seeded numpy generator
keyed by ``(seed, epoch)``, so a run is reproducible and resumable.

All arrays are ``int32[N, T]`` with the keys of :func:`alter_jax.data.prompts.encode_qa`
(``input_ids``, ``attention_mask``, ``labels``), right-padded to ``T = max_length``.

**Length buckets.** A training batch is cut to the smallest bucket width ``W`` (a multiple of
``ModelSpec.length_bucket``, at most ``T``) that holds its longest row (:func:`bucket_batch`),
and carries ``score_pos int32[B, A]``: the logit positions whose next token a loss scores,
compacted to the left and padded with -1, ``A`` itself bucketed. The jitted step therefore sees
a few static shapes ``(W, A)`` (one compile each) and runs the vocabulary head on ``A`` positions
per row instead of ``T``.
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
    aligned: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Iterator[dict[str, Batch]]:
    """Yield ``{"forget": batch, "retain": batch}``: forget examples in (seeded) order,
    each with its randomly paired retain example at the same batch position. ``aligned``: more
    sides row-aligned with ``forget`` (e.g. ``{"idk": arrays}``: the same questions with an "I don't
    know" answer), taken at the forget indices."""
    n_f = len(next(iter(forget.values())))
    n_r = len(next(iter(retain.values())))
    for name, side in (aligned or {}).items():
        if len(next(iter(side.values()))) != n_f:
            raise ValueError(f"forget_retain_batches: side {name!r} has {len(next(iter(side.values())))} rows, "
                             f"forget {n_f}; aligned sides need one row per forget row")
    for idx in forget_retain_index_batches(n_f, n_r, batch_size, seed, epoch, shuffle, drop_last):
        out = {"forget": take(forget, idx["forget"]), "retain": take(retain, idx["retain"])}
        for name, side in (aligned or {}).items():
            out[name] = take(side, idx["forget"])
        yield out


def forget_retain_index_batches(n_forget: int, n_retain: int, batch_size: int, seed: int = 0, epoch: int = 0,
                                shuffle: bool = True, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The row indices behind :func:`forget_retain_batches`: ``{"forget": idx, "retain": partner[idx]}``
    (``int64[b]`` each; an aligned side uses the forget indices), so a process can load only the
    rows of a batch it holds."""
    partner = pair_forget_retain(n_forget, n_retain, seed, epoch)
    for idx in batch_indices(n_forget, batch_size, shuffle, seed, epoch, drop_last):
        yield {"forget": idx, "retain": partner[idx]}


def fill_indices(idx: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """:func:`fill_batch` on row indices: a short batch repeats its rows up to ``batch_size``."""
    return {s: np.resize(np.asarray(v), batch_size) for s, v in idx.items()}


def fill_batch(batch: Mapping[str, Mapping[str, np.ndarray]], batch_size: int) -> dict[str, Batch]:
    """Static batch shapes: a short (last) forget/retain batch repeats its rows up to
    ``batch_size`` (their loss counts twice; one batch per epoch at most)."""
    n = len(next(iter(batch.values()))["input_ids"])
    if n == batch_size:
        return {s: dict(v) for s, v in batch.items()}
    idx = np.resize(np.arange(n), batch_size)
    return {s: {k: v[idx] for k, v in batch[s].items()} for s in batch}


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


# ----------------------------------------------------------------------------- length buckets
def bucket_width(n: int, multiple: int, max_width: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n`` (at least ``multiple``), capped at
    ``max_width``; ``multiple <= 0`` means no buckets (always ``max_width``)."""
    if multiple <= 0:
        return max_width
    return int(min(max_width, max(multiple, -(-n // multiple) * multiple)))


def sorted_row_batches(lengths: np.ndarray, batch_size: int, multiple: int,
                       max_width: int) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of right-padded rows for scoring, longest first: yields ``(rows int[<= B], W)``, ``W`` the
    batch's longest row rounded up to :func:`bucket_width` (causal attention: a row's scores do not depend
    on the padding after it, so each batch is cut to ``[:, :W]``)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        yield rows, bucket_width(int(lengths[rows].max(initial=1)), multiple, max_width)


def scored_positions(labels: np.ndarray, width: int) -> np.ndarray:
    """``int32[N, width]``: per row the logit positions ``t`` whose target ``labels[:, t + 1]`` is
    scored (``!= -100``), in order and compacted to the left, then ``-1``. ``width`` must hold the
    row with the most scored tokens."""
    scored = labels[:, 1:] != -100
    counts = scored.sum(1)
    if len(counts) and counts.max() > width:
        raise ValueError(f"scored_positions: a row has {int(counts.max())} scored tokens, more than width {width}")
    out = np.full((labels.shape[0], width), -1, np.int32)
    for i, row in enumerate(scored):
        pos = np.flatnonzero(row)
        out[i, : len(pos)] = pos
    return out


def row_lengths(mask: np.ndarray) -> np.ndarray:
    """Right-padded rows: index of the last real token + 1 (0 for an empty row)."""
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1), 0)


def row_metadata(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row of encoded ``[N, T]`` arrays what :func:`bucket_dims` needs: ``length`` (last real
    token + 1), ``scored`` (tokens a loss scores, ``labels[:, 1:] != -100``) and ``tokens`` (real
    tokens), each ``int64[N]``. Cheap to keep for every row on every process."""
    return {"length": row_lengths(arrays["attention_mask"]).astype(np.int64),
            "scored": (arrays["labels"][:, 1:] != -100).sum(1).astype(np.int64),
            "tokens": arrays["attention_mask"].sum(1).astype(np.int64)}


def bucket_dims(meta: Mapping[str, Mapping[str, np.ndarray]], idx: Mapping[str, np.ndarray], multiple: int,
                max_width: int) -> tuple[int, int]:
    """``(W, A)`` of the forget/retain batch of rows ``idx`` (per side, into :func:`row_metadata`'s
    ``meta``): the bucket width and scored-position bucket :func:`bucket_batch` would choose from the
    whole batch, computed without its token arrays, so that every process of a multi-process run cuts
    its own rows of one global batch to the same static shape."""
    width = bucket_width(max(int(meta[s]["length"][idx[s]].max(initial=1)) for s in idx), multiple, max_width)
    n_scored = max(int(np.minimum(meta[s]["scored"][idx[s]], width - 1).max(initial=1)) for s in idx)
    a = bucket_width(n_scored, multiple, width - 1) if width > 1 else 1
    return width, a


def bucket_batch(batch: Mapping[str, Mapping[str, np.ndarray]], multiple: int,
                 dims: tuple[int, int] | None = None) -> dict[str, Batch]:
    """A forget/retain batch (``{"forget": {...}, "retain": {...}}``, right-padded ``[B, T]``
    token arrays) cut to its length bucket ``W`` (shared by both sides, see the module
    docstring), with ``score_pos int32[B, A]`` added to each side (:func:`scored_positions`;
    ``A`` the bucket of the most scored tokens in a row, at most ``W - 1``). Per-row arrays
    (``expert``, ``ref_logp``) are kept as they are. ``dims = (W, A)`` imposes the shape (from
    :func:`bucket_dims` of the global batch when ``batch`` holds one process's rows of it)."""
    sides = list(batch)
    t = batch[sides[0]]["input_ids"].shape[1]
    if dims is not None:
        width, a = dims
    else:
        width = bucket_width(max(int(row_lengths(batch[s]["attention_mask"]).max(initial=1)) for s in sides), multiple, t)
        n_scored = max(int((batch[s]["labels"][:, 1:width] != -100).sum(1).max(initial=1)) for s in sides)
        a = bucket_width(n_scored, multiple, width - 1) if width > 1 else 1
    out = {}
    for s in sides:
        side = {k: (v[:, :width] if np.ndim(v) == 2 and np.shape(v)[1] == t else v) for k, v in batch[s].items()}
        if np.any(batch[s]["attention_mask"][:, width:]):
            raise ValueError("bucket_batch: rows must be right-padded (real tokens found past the bucket width)")
        side["score_pos"] = scored_positions(side["labels"], a)
        out[s] = side
    return out
