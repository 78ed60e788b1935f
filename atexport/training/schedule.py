"""Seeding, the learning-rate schedule and the random-number state: what makes a resumed run exact.

Each epoch's shuffling and augmentation are seeded from ``(seed, epoch, rank)`` (:func:`epoch_seed`), and
``last.pt`` carries every generator's state (:func:`rng_state`), so a run continued from it matches an
uninterrupted one.
"""

from __future__ import annotations

import math
import random


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's shuffling and augmentation, independent of what ran before."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank) * 101 + 12345) % 2**31


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` then per-step cosine to ``min_lr`` (the official schedule)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rng_state() -> dict:
    import numpy as np
    import torch

    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(st["torch"])
    random.setstate(_tuples(st["python"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if st.get("cuda") and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x

