"""Atomic checkpoint writing and safe checkpoint loading.

Writing: ``save_checkpoint`` serialises to a hidden temporary file next to the target, fsyncs it
and renames it over the target with ``os.replace``. A crash, a full disk or a preemption kill in
the middle of a save therefore never leaves a half-written ``checkpoint.pth``: the reader sees
either the previous file or the new one. Only rank 0 should save; the caller decides who that is
(e.g. ``if is_main_process(): save_training_checkpoint(...)``).

Loading: every load goes through ``torch.load(..., weights_only=True)``; there is no fallback to
full pickle, because a checkpoint downloaded from the internet can run arbitrary code when
unpickled. Official SAM-DETR / DETR checkpoints store the training flags as an
``argparse.Namespace`` under ``args``, which the weights-only unpickler refuses by default, so the
loader allows exactly that one class (``_OFFICIAL_CHECKPOINT_GLOBALS``), and only inside a local
``torch.serialization.safe_globals`` context so the process-wide allowlist stays untouched. The
official argument parsers only hold str/int/float/bool/None/list values, so no other class
(pathlib, numpy) is needed. Our own checkpoints store ``args`` as a plain dict
(``checkpoint_args_to_dict``) and load with a plain ``torch.load(weights_only=True)``.

Caveat: torch keeps a single process-wide set for ``safe_globals``, so the allowlist is active for
every thread while a load runs, and leaving the context removes ``argparse.Namespace`` even if
other code had added it with ``add_safe_globals``. Load checkpoints from one thread.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlparse

import numpy as np
import torch

__all__ = [
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "args_from_checkpoint",
    "checkpoint_args_to_dict",
    "load_checkpoint",
    "save_checkpoint",
    "save_training_checkpoint",
]

PathLike = Union[str, "os.PathLike[str]"]

# The only non-default class the weights-only unpickler may build: official checkpoints pickle the
# parsed command line as a Namespace. Namespace.__init__/BUILD only sets attributes; it runs no
# user code. Anything else (pathlib, numpy, custom classes) stays refused.
_OFFICIAL_CHECKPOINT_GLOBALS = [argparse.Namespace]

# Value types that the weights-only unpickler accepts without an allowlist.
_PLAIN_SCALARS = (str, int, float, bool, type(None))

# How torch names the global it refused (see torch/_weights_only_unpickler.py).
_REFUSED_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE),
    re.compile(r"classes allowlisted via `add_safe_globals` but got (.+)$", re.MULTILINE),
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs a global (class/function) outside the allowlist to be unpickled.

    It was refused by the weights-only unpickler before any of its code ran.
    """

    def __init__(self, source: str, refused: list[str], detail: str) -> None:
        self.source = source
        self.refused = refused
        names = ", ".join(refused) if refused else "unknown"
        super().__init__(
            f"Refused to load checkpoint '{source}': it needs the global(s) {names}, which are not "
            f"on the allowlist ({_allowlist_names()}). Nothing from the file was executed. Only a "
            f"trusted file should ever be converted (e.g. re-saved with plain tensors/dicts). "
            f"torch said: {detail}"
        )


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but is truncated, corrupt or not a torch checkpoint at all."""

    def __init__(self, source: str, detail: str) -> None:
        self.source = source
        super().__init__(
            f"Could not read checkpoint '{source}': the file is truncated, corrupt or not a "
            f"torch checkpoint (e.g. an HTML page saved instead of the file). torch said: {detail}"
        )


def _allowlist_names() -> str:
    return ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in _OFFICIAL_CHECKPOINT_GLOBALS)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` atomically with ``torch.save``.

    Call this from rank 0 only. On any exception (including KeyboardInterrupt) the temporary file
    is removed, the exception is re-raised, and a previous checkpoint at ``path`` stays intact.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Checkpoint directory '{path.parent}' does not exist (saving '{path}')")
    tmp_path = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Make the bytes durable before the rename makes them visible under the real name.
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; POSIX only, best effort (some network filesystems refuse)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_checkpoint(
    output_dir: PathLike, state: Mapping[str, Any], epoch: int, save_every_epoch: int
) -> list[Path]:
    """Write the per-epoch checkpoint set (official naming), each file atomically.

    ``checkpoint.pth`` is rewritten every epoch (the file to resume from); ``checkpoint{epoch:04}.pth``
    is kept when ``(epoch + 1) % save_every_epoch == 0``. ``save_every_epoch=0`` disables the
    numbered copies. Rank 0 only. Returns the paths written.
    """
    if save_every_epoch < 0:
        raise ValueError(f"save_every_epoch must be >= 0 (0 disables numbered copies), got {save_every_epoch}")
    output_dir = Path(output_dir)
    paths = [output_dir / "checkpoint.pth"]
    if save_every_epoch > 0 and (epoch + 1) % save_every_epoch == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    for path in paths:
        save_checkpoint(state, path)
    return paths


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(path_or_url: PathLike, map_location: Any = "cpu", check_hash: bool = True) -> dict:
    """Load a checkpoint from a local path or an ``https://`` URL, weights-only, never unsafely.

    URLs are downloaded into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and reused from
    there. ``check_hash`` verifies the ``-<hexdigits>.`` hash prefix in the file name, when the name
    has one (torch.hub convention). Plain ``http://`` is refused: the file could be swapped in
    transit and we do not verify content. Raises ``FileNotFoundError`` (missing file),
    ``CorruptCheckpointError`` (truncated/garbled), ``UnsafeCheckpointError`` (needs a global outside
    the allowlist).
    """
    source = os.fspath(path_or_url)
    if "://" not in source:
        return _load_file(source, map_location)
    scheme = urlparse(source).scheme.lower()
    if scheme == "https":
        return _load_url(source, map_location, check_hash)
    if scheme == "http":
        raise ValueError(f"Refusing to download checkpoint over plain http: '{source}'. Use an https:// URL.")
    raise ValueError(f"Unsupported checkpoint URL scheme '{scheme}' in '{source}' (only https:// and local paths)")


def _load_file(path: str, map_location: Any) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint file '{path}' does not exist")
    with _translate_load_errors(path, scan_path=path):
        with torch.serialization.safe_globals(_OFFICIAL_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def _load_url(url: str, map_location: Any, check_hash: bool) -> dict:
    # The hub function calls torch.load itself; weights_only=True plus the same local allowlist.
    with _translate_load_errors(url, scan_path=None):
        with torch.serialization.safe_globals(_OFFICIAL_CHECKPOINT_GLOBALS):
            return torch.hub.load_state_dict_from_url(
                url, map_location=map_location, check_hash=check_hash, weights_only=True
            )


@contextlib.contextmanager
def _translate_load_errors(source: str, scan_path: Optional[str]):
    """Turn torch's load errors into ones that name the file and say what went wrong."""
    try:
        yield
    except pickle.UnpicklingError as err:
        detail = _weights_unpickler_detail(str(err))
        refused = _refused_globals(detail, scan_path)
        if refused:
            raise UnsafeCheckpointError(source, refused, detail) from None
        # No global involved: a garbled stream (e.g. "Unsupported operand") rather than a refusal.
        raise CorruptCheckpointError(source, detail) from None
    except EOFError as err:
        raise CorruptCheckpointError(source, f"{type(err).__name__}: {err}") from None
    except RuntimeError as err:
        if isinstance(err, (UnsafeCheckpointError, CorruptCheckpointError)):
            raise
        raise CorruptCheckpointError(source, str(err)) from None


def _weights_unpickler_detail(message: str) -> str:
    """The unpickler's own sentence, without torch's advice to re-run with weights_only=False."""
    marker = "WeightsUnpickler error:"
    detail = message.split(marker, 1)[1] if marker in message else message
    # Drop torch's advice on allowlisting / weights_only=False: this loader never takes it.
    detail = re.split(r"Check the documentation of torch\.load| Please use `torch\.serialization", detail)[0]
    return " ".join(detail.split())


def _refused_globals(detail: str, scan_path: Optional[str]) -> list[str]:
    """Globals the file needs beyond the allowlist: the one torch named, plus a static scan."""
    names: list[str] = []
    for pattern in _REFUSED_GLOBAL_PATTERNS:
        match = pattern.search(detail)
        if match:
            name = match.group(1).rstrip(".")
            # torch prints builtins without their module ("getattr"); the scan below does not.
            names.append(name if "." in name or " " in name else f"builtins.{name}")
            break
    if scan_path is not None and names:
        # The scan reads the pickle opcodes without executing them; it lists every offender, not
        # just the first one torch stopped at (useful when the first is e.g. builtins.getattr).
        with contextlib.suppress(Exception):
            allowed = {f"{c.__module__}.{c.__qualname__}" for c in _OFFICIAL_CHECKPOINT_GLOBALS}
            scanned = torch.serialization.get_unsafe_globals_in_checkpoint(scan_path)
            names += [n for n in scanned if n not in allowed and n not in names]
    return names


# --------------------------------------------------------------------------------------------
# Training flags stored in checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_args_to_dict(args: Union[argparse.Namespace, Mapping[str, Any]]) -> dict:
    """The training flags as a dict of plain values, to store under ``args`` in our checkpoints.

    Plain values (str/int/float/bool/None, lists/tuples/dicts of them) load with
    ``torch.load(weights_only=True)`` and no allowlist. ``Path`` becomes ``str`` and numpy scalars
    become Python scalars; any other type raises ``TypeError`` naming the flag. Call it once at
    start-up so a bad flag fails before training rather than at the first save.
    """
    items = vars(args) if isinstance(args, argparse.Namespace) else args
    return {str(key): _to_plain(value, str(key)) for key, value in items.items()}


def _to_plain(value: Any, key: str) -> Any:
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(
        f"Flag '{key}' has type {type(value).__module__}.{type(value).__qualname__}, which a "
        f"weights-only checkpoint cannot hold; convert it to str/int/float/bool/None/list/dict"
    )


def args_from_checkpoint(ckpt: Mapping[str, Any]) -> dict:
    """The flags stored in a checkpoint: official ``Namespace``, our dict, or ``{}`` if absent."""
    args = ckpt.get("args")
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise TypeError(
        f"Checkpoint key 'args' holds {type(args).__module__}.{type(args).__qualname__}; "
        f"expected argparse.Namespace or dict"
    )
