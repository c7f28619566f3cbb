"""What this machine's CPU can do, read without importing torch (config loading must stay light: ingest runs
under a memory limit before any model is imported)."""
from __future__ import annotations

from pathlib import Path


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 instructions (``avx512_bf16`` or AMX): where bf16 autocast is fast.

    Without them torch emulates bf16 and a step is slower than fp32, so a preset asks for bf16 on the CPU only
    where this is True. ``cpuinfo``: the text of /proc/cpuinfo (read when None; False where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})
