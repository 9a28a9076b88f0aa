"""core.malloc: freed memory stays with the process for the next allocation of its size."""
import os
import subprocess
import sys

import pytest

from core.malloc import keep_freed_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process allocates 40 MB (above glibc's largest automatic mmap threshold, 32 MB),
# touches every byte, frees it, five times, and prints its page faults after the first time.
_PROBE = """
import ctypes, resource, sys
sys.path.insert(0, {repo!r})
if {tune}:
    from core.malloc import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tune: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=REPO, tune=tune)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not keep_freed_memory(), reason="no glibc here: keep_freed_memory changes nothing")
def test_a_freed_block_is_reused_without_page_faults():
    untuned, tuned = _faults(False), _faults(True)
    # glibc's defaults map 40 MB afresh each time (10240 faults of 4 KB pages, fewer with
    # huge pages); kept, the block comes back from the heap with its pages in place.
    assert untuned > 0 and tuned * 10 < untuned, (untuned, tuned)

