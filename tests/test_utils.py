"""Atomic writes (all or nothing, with the permissions a plain write would give); freed memory returned."""

import os
import platform
import stat

import numpy as np
import pytest

from swinssl.utils import atomic_path, atomic_write_text


def test_atomic_write_has_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("a.txt") == mode("b.txt") == 0o644  # not mkstemp's 0600: others on a cluster can read outputs


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_freed_heap_blocks_to_the_kernel():
    from swinssl.runtime import release_freed_memory

    def resident_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    blocks = [np.ones(8192) for _ in range(3000)]  # 64 KiB each: heap blocks (below glibc's mmap threshold)
    kept = blocks[19::20]  # one block in 20 stays, so the freed ones sit between live ones and are not trimmed
    del blocks
    before = resident_mib()
    assert release_freed_memory()
    assert before - resident_mib() > 100, "about 180 MiB were freed inside the heap"
    assert len(kept) == 150
