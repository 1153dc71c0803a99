"""lorakit.allocator: a capped mmap threshold returns freed blocks to the system (glibc)."""

import os
import subprocess
import sys

import pytest

from lorakit.allocator import cap_mmap_threshold, trim_heap

PROBE = """
import re, sys, torch
from pathlib import Path
from lorakit.allocator import cap_mmap_threshold

def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

capped = cap_mmap_threshold() if sys.argv[1] == "capped" else False
big = torch.ones(2 * 1024 * 1024)  # an 8 MiB block, freed: glibc's dynamic threshold rises to it
del big
before = rss_mb()
blocks = [torch.ones(256 * 1024) for _ in range(200)]  # 200 x 1 MiB
del blocks[::2]  # every other one freed: 100 MiB of holes inside the heap, which shrinks only from its top
print(capped, rss_mb() - before)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc's allocator")


PROBES = {"capped": ("capped", {}), "default": ("default", {}), "user": ("capped", {"MALLOC_MMAP_THRESHOLD_": "131072"})}


@pytest.fixture(scope="module")
def retained() -> dict[str, tuple[str, float]]:
    """Each probe of ``PROBES`` in a process of its own, all started at once (each measures its own RSS):
    name -> (whether lorakit capped the threshold, MiB retained)."""
    procs = {name: subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**os.environ, **env}) for name, (mode, env) in PROBES.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        capped, mb = out.split()
        results[name] = capped, float(mb)
    return results


@glibc
def test_capped_threshold_returns_freed_blocks(retained):
    capped, mb = retained["capped"]
    assert capped == "True" and mb < 130  # the 100 MiB kept, the 100 MiB freed went back to the system


@glibc
def test_default_threshold_keeps_freed_blocks(retained):
    """The habit the cap is for: without it the freed 100 MiB stay resident."""
    assert retained["default"][1] > 170


@glibc
def test_user_setting_wins(retained):
    capped, mb = retained["user"]
    assert capped == "False" and mb < 130  # not set by lorakit, and the user's own threshold works


def test_bad_threshold():
    with pytest.raises(ValueError, match="byte count"):
        cap_mmap_threshold(-1)


def test_trim_heap_runs():
    trim_heap()
