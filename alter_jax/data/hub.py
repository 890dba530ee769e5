"""Hugging Face hub datasets, without the retry back-off on machines that cannot reach the hub.

``datasets.load_dataset`` retries an unreachable hub for tens of seconds before failing
(issue 14: 28-45 s per split). :func:`load_hub_dataset` probes the hub once
(:func:`alter_jax.models.registry.hub_reachable`, no retries); when it is not reachable it
reads the local datasets cache only, and the caller's error can say both things at once.
"""

from __future__ import annotations

import os
from typing import Any


class HubDatasetError(RuntimeError):
    """A hub dataset could not be loaded; ``reachable`` says whether the hub answered."""

    def __init__(self, message: str, reachable: bool):
        super().__init__(message)
        self.reachable = reachable


def load_hub_dataset(hub_id: str, config: str | None, split: str) -> Any:
    """``datasets.load_dataset(hub_id, config, split=split)``, offline at once when the hub is
    not reachable. Raises :class:`HubDatasetError` with a one-line reason."""
    from alter_jax.models.registry import hub_reachable

    reachable = hub_reachable()
    if not reachable:  # the local datasets cache only
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    if not reachable:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # network, unknown config or split, ...
        reason = ("the Hugging Face hub is not reachable and the local datasets cache does not hold it"
                  if not reachable else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise HubDatasetError(reason, reachable) from e
