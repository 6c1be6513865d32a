"""What machine this is: the CPU's name and feature flags, which torch device to use, peak memory.

Benchmarks record the CPU with every figure, export manifests record it with the software versions, and the
server picks its CPU precision from the flags; all of them read it here. torch is imported only inside
`resolve_device`, so reading the CPU costs nothing.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {key: value} ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    """ "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13", ...: /proc/cpuinfo's model name, else platform's."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (avx2, avx512_vnni, amx_bf16, ...); empty where
    /proc/cpuinfo does not exist (macOS, Windows): callers then assume nothing beyond the baseline."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


# the features that decide how fast a CPU runs a ViT, in /proc/cpuinfo's spelling: 8-bit dot products
# (avx512_vnni) speed up INT8; AMX tiles (amx_bf16, amx_int8) make bf16 and INT8 matrix products several
# times faster than fp32
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_features(flags: frozenset[str] | None = None) -> dict[str, bool]:
    """{feature: present} for each of `CPU_FEATURES`, from `flags` (default: this machine's `cpu_flags()`,
    read once per process); tests pass the flags of another machine."""
    have = cpu_flags() if flags is None else frozenset(flags)
    return {f: f in have for f in CPU_FEATURES}


def resolve_device(device: str, error: type[Exception] = ValueError):
    """ "auto" -> cuda if available else cpu; an unknown name or a CUDA device that is not there raises
    `error` (each caller's own error type) with what is allowed."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise error(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory in bytes (None where it cannot be read). Linux's VmHWM, not
    ru_maxrss: a process started by fork + exec (a CLI run from a big Python process) inherits its parent's
    ru_maxrss, but gets a fresh VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
