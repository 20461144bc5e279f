"""Datasets for the data-backed task families: TFDS builders of the project's own (Omniglot), any prepared
TFDS image-classification dataset, and tasks from a user's NPZ or CSV file (no downloads)."""

from __future__ import annotations

import numpy as np


def groups(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order, unique ids, start, count): `order` sorts the members by id (stably), after which the
    members with the g-th smallest id are order[start[g] : start[g] + count[g]]."""
    order = np.argsort(ids, kind="stable")
    unique, start, count = np.unique(ids[order], return_index=True, return_counts=True)
    return order, unique, start, count


def one_line(e: BaseException) -> str:
    """An exception's message on one line of at most 200 characters (for messages that quote it)."""
    return " ".join(str(e).split())[:200] or type(e).__name__
