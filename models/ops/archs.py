"""CUDA architectures of the deformable-attention kernels: which to build, and which run where.

Shared by ``setup.py`` (and so ``make.sh``), ``.ci/build_ops.sh`` (``python archs.py`` prints the
list it would build) and the loader in ``cuda_impl.py``. Pure Python: torch is imported only to
look at the visible GPUs, so the module imports anywhere.

Lists use the ``TORCH_CUDA_ARCH_LIST`` syntax, e.g. ``"7.5;8.0;9.0+PTX"``: every entry is built as
SASS (machine code for that capability) and an entry with ``+PTX`` also as PTX, which the driver
compiles on first use for any GPU of that capability or newer. SASS built for ``X.y`` runs on
``X.z`` with ``z >= y`` only; an arch-specific target such as ``9.0a`` runs on ``9.0`` only.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

__all__ = ["ARCH_LIST_ENV", "Arch", "DEFAULT_ARCH_LIST", "arch_list_for", "built_archs_flags", "can_run",
           "parse_arch_list", "resolve_arch_list"]

ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
# What torch 2.14 (CUDA 13) itself runs on -- torch.cuda.get_arch_list() is sm_75, sm_80, sm_86, sm_90,
# sm_100 and sm_120, and sm_86 runs sm_80's SASS -- plus PTX of the newest, which later GPUs JIT-compile.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0;10.0;12.0+PTX"
# TORCH_CUDA_ARCH_LIST=native means "the visible GPUs", as in torch.
NATIVE = "native"
PTX_SUFFIX = "+PTX"
SPECIFIC_SUFFIX = "a"
LIST_SEPARATOR = ";"
# The C preprocessor define that records the built list inside the binary (see src/ms_deform_attn.cpp).
# Its value separates entries with commas: a ';' would end the shell command that ninja runs.
BUILT_ARCHS_DEFINE = "SAMDETR_BUILT_ARCHS"
DEFINE_SEPARATOR = ","

_ENTRY = re.compile(r"(\d+)\.(\d)(a?)(\+PTX)?")
_TORCH_ARCH = re.compile(r"sm_(\d+)(\d)a?")

Capability = tuple[int, int]  # (major, minor), as torch.cuda.get_device_capability returns it


class Arch(NamedTuple):
    """One entry of an arch list: SASS for ``(major, minor)``, plus PTX if ``ptx``."""

    major: int
    minor: int
    ptx: bool = False
    specific: bool = False  # "9.0a": arch-specific features, runs on exactly this capability

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{SPECIFIC_SUFFIX * self.specific}{PTX_SUFFIX * self.ptx}"

    def runs_on(self, capability: Capability) -> bool:
        """Whether a GPU of ``capability`` can run this entry's SASS or JIT its PTX."""
        own = (self.major, self.minor)
        if self.specific:
            return tuple(capability) == own
        sass = capability[0] == self.major and capability[1] >= self.minor
        return sass or (self.ptx and tuple(capability) >= own)


def parse_arch_list(text: str) -> list[Arch]:
    """``"7.5;8.0;9.0+PTX"`` (``;`` or blanks between entries) -> ``Arch`` entries.

    Raises ``ValueError`` for entries other than ``X.Y[a][+PTX]`` (torch's names such as "Ampere")
    and for an empty list.
    """
    entries = [entry for entry in re.split(r"[;\s]+", text.strip()) if entry]
    if not entries:
        raise ValueError("empty CUDA arch list")
    archs = []
    for entry in entries:
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(f"unsupported CUDA arch entry {entry!r} in {text!r} (expected X.Y[a][+PTX])")
        major, minor, specific, ptx = match.groups()
        archs.append(Arch(int(major), int(minor), ptx=bool(ptx), specific=bool(specific)))
    return archs


def format_arch_list(archs: Iterable[Arch]) -> str:
    return LIST_SEPARATOR.join(str(arch) for arch in archs)


def can_run(capability: Capability, archs: Sequence[Arch]) -> bool:
    """Whether a GPU of ``capability`` runs a binary built for ``archs``."""
    return any(arch.runs_on(capability) for arch in archs)


def arch_list_for(capabilities: Iterable[Capability], supported: Sequence[Capability] = ()) -> str:
    """The list for these GPUs: SASS for each capability, ``+PTX`` on the newest.

    Capabilities are clamped into the range of ``supported`` (when given): nvcc cannot target a GPU
    newer than itself (the clamped PTX still JITs there), nor one older than its oldest target (such
    a GPU cannot run torch either; the runtime check then falls back to the PyTorch path).
    """
    clamped = {tuple(capability) for capability in capabilities}
    if not clamped:
        raise ValueError("no GPU capabilities to build for")
    if supported:
        lowest, highest = min(supported), max(supported)
        clamped = {min(max(capability, lowest), highest) for capability in clamped}
    archs = [Arch(major, minor) for major, minor in sorted(clamped)]
    archs[-1] = archs[-1]._replace(ptx=True)
    return format_arch_list(archs)


def visible_capabilities() -> list[Capability]:
    """Capabilities of the GPUs this process sees (none without CUDA)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return []
    return [tuple(torch.cuda.get_device_capability(index)) for index in range(torch.cuda.device_count())]


def supported_capabilities() -> list[Capability]:
    """The capabilities torch was built for (``torch.cuda.get_arch_list()``), the range nvcc targets."""
    import torch

    matches = (_TORCH_ARCH.fullmatch(name) for name in torch.cuda.get_arch_list())
    return [(int(match[1]), int(match[2])) for match in matches if match]


def resolve_arch_list(environ: Optional[Mapping[str, str]] = None) -> str:
    """The list to build: the user's ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs', else the default."""
    requested = (os.environ if environ is None else environ).get(ARCH_LIST_ENV, "").strip()
    if requested and requested != NATIVE:
        return requested
    capabilities = visible_capabilities()
    if not capabilities:
        return DEFAULT_ARCH_LIST
    return arch_list_for(capabilities, supported_capabilities())


def built_archs_flags(arch_list: str) -> list[str]:
    """Compiler flags that record ``arch_list`` in the binary (none if it is not ``X.Y[+PTX]`` entries:
    the extension then reports an empty list, which the loader treats as unknown)."""
    try:
        archs = parse_arch_list(arch_list)
    except ValueError:
        return []
    return [f"-D{BUILT_ARCHS_DEFINE}={DEFINE_SEPARATOR.join(str(arch) for arch in archs)}"]


if __name__ == "__main__":
    print(resolve_arch_list())
