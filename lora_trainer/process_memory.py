"""This process's memory as the OS counts it (resident set), on Linux, macOS and Windows: None where it does not say.

Standard library only, and nothing from this package: the benchmarks run this file's source in other interpreters
too (sd-scripts' venv), to measure both trainers the same way.
"""

from __future__ import annotations

import os
import sys


def _windows_counters():
    """psapi's PROCESS_MEMORY_COUNTERS of this process (sizes in bytes)."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    kernel32, psapi = ctypes.WinDLL("kernel32"), ctypes.WinDLL("psapi")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return None
    return counters


def peak_rss_mib() -> float | None:
    if os.name == "nt":
        counters = _windows_counters()
        return None if counters is None else counters.PeakWorkingSetSize / 2**20
    try:  # Linux: this program's own peak; getrusage's counts the parent's too when it was started from a big one
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def rss_mib() -> float | None:
    if os.name == "nt":
        counters = _windows_counters()
        return None if counters is None else counters.WorkingSetSize / 2**20
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # macOS: no /proc, and only the peak from getrusage
        return None
