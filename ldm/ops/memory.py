"""Giving memory-mapped checkpoint pages back to the kernel (Linux; elsewhere these do nothing).

* :func:`release_file_pages`: after a conv weight was packed (:class:`ldm.ops.Conv2d`), drop the
  weight's pages from the process when they are still the untouched page-cache pages of the
  checkpoint file, so the packed copy takes its place in memory instead of doubling it.
* :func:`release_mapped_range`: while a ``.safetensors`` file is read and cast tensor by tensor
  (:func:`ldm.checkpoint.read_checkpoint`), drop the pages of the part already read from the
  read-only mapping, so the process never holds the whole file besides the cast model.

The data never changes: dropped pages stay in the kernel's page cache and are mapped back in from
the file when read again.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
import torch

_MADV_DONTNEED = 4
_libc = None


def release_file_pages(t: torch.Tensor) -> int:
    """Drop ``t``'s memory pages from this process when they are still the page-cache pages of a
    privately mapped file (a memory-mapped checkpoint nobody wrote to); returns the bytes released
    (0 elsewhere: other platforms, anonymous memory, written pages, a tensor smaller than a page).

    ``MADV_DONTNEED`` would discard pages that were written (copy-on-write copies of the file's),
    so ``/proc/self/pagemap`` is read first and anything but untouched or file-backed pages leaves
    the tensor alone. Only whole pages inside the tensor are named, so neighbouring tensors keep
    theirs.
    """
    global _libc
    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi <= lo or not _in_private_file_mapping(lo, hi) or not _only_file_pages(lo, hi, page):
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return hi - lo if _libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0 else 0


def release_mapped_range(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drop the pages of bytes ``[begin, end)`` of a read-only file mapping ``mm`` from the process
    (``MADV_DONTNEED``, harmless on a read-only file mapping): from the page holding ``begin`` to the
    last page that ends inside the range, so the page shared with the bytes after ``end`` is kept.
    For reading a file front to back, releasing what was read. Nothing where mmap has no madvise."""
    page = mmap.PAGESIZE
    lo, hi = begin // page * page, end // page * page
    if hasattr(mm, "madvise") and hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _only_file_pages(lo: int, hi: int, page: int) -> bool:
    """Whether every page of ``[lo, hi)`` is either not yet mapped in (and not swapped out) or a
    page-cache page of the file (``/proc/self/pagemap``: bit 63 present, 62 swapped, 61 file)."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            entries = np.frombuffer(f.read((hi - lo) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    if entries.size != (hi - lo) // page:
        return False
    present, swapped, file = (entries >> np.uint64(63)) & 1, (entries >> np.uint64(62)) & 1, (entries >> np.uint64(61)) & 1
    return bool(np.all(np.where(present == 1, file == 1, swapped == 0)))


def _in_private_file_mapping(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` lies in one private mapping of a regular file (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                a, b = (int(v, 16) for v in fields[0].split("-"))
                if a <= lo < b:
                    return (hi <= b and fields[1].endswith("p") and fields[4] != "0" and len(fields) == 6
                            and fields[5].startswith("/"))
    except (OSError, ValueError, IndexError):
        pass
    return False
