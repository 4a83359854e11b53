"""Capture and restore every random number generator training draws from.

The state is made of tensors, ints, floats, strings and tuples only, so it can be stored in a
checkpoint that loads with ``torch.load(weights_only=True)`` and no allowlist (numpy arrays and
Python's ``random`` state tuple are converted to int64 tensors).

The state is per process. A checkpoint holds every rank's (gathered to the writer), and each rank
of a resumed run with the same process count restores its own, so that a resumed run draws exactly
what an uninterrupted one would have drawn (the training data draw nothing from these generators:
see ``datasets.sampling``).
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict:
    """Torch CPU, CUDA (every device, if CUDA is initialised), numpy global and Python ``random``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    # Only when initialised: querying would otherwise start CUDA in a process that never used it
    # (and nothing has been drawn from its generators yet anyway).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from ``get_rng_state()`` output; absent entries are left as they are."""
    unknown = set(state) - {"torch", "cuda", "numpy", "python"}
    if unknown:
        raise KeyError(f"Unknown RNG state entries {sorted(unknown)}; expected torch/cuda/numpy/python")
    if "torch" in state:
        # map_location may have moved the tensor; the CPU generator takes a CPU ByteTensor only.
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "python" in state:
        random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state:
        _set_cuda_states(list(state["cuda"]))


def _set_cuda_states(states: list[torch.Tensor]) -> None:
    """Restore per-device CUDA states; skipped without CUDA (e.g. inspecting a GPU run on CPU)."""
    if not torch.cuda.is_available():
        return
    count = min(len(states), torch.cuda.device_count())
    for device in range(count):
        torch.cuda.set_rng_state(states[device].cpu(), device)


def _numpy_state_to_plain(np_state: tuple) -> dict:
    # np.random.get_state() -> ('MT19937', uint32[624] keys, pos, has_gauss, cached_gaussian).
    name, keys, pos, has_gauss, cached_gaussian = np_state
    return {
        "bit_generator": str(name),
        # int64 holds every uint32 exactly and is a dtype the weights-only loader knows well.
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_plain(plain: Mapping[str, Any]) -> tuple:
    keys = plain["keys"].cpu().numpy().astype(np.uint32)
    return (plain["bit_generator"], keys, plain["pos"], plain["has_gauss"], plain["cached_gaussian"])


def _python_state_to_plain(py_state: tuple) -> dict:
    # random.getstate() -> (version, tuple of 625 ints < 2**32, gauss_next or None).
    version, internal, gauss_next = py_state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _python_state_from_plain(plain: Mapping[str, Any]) -> tuple:
    internal = tuple(int(v) for v in plain["internal"].tolist())
    return (plain["version"], internal, plain["gauss_next"])
