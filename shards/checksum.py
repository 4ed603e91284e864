"""CRC32C (the checksum GCS itself uses) over any buffer, without copying it.

``google_crc32c``'s Python functions take only ``bytes``-like objects that own no releasable buffer, so a checksum
of voxels read straight into a batch slot (a numpy view of a torch tensor) would first have to copy them: a
second full pass over every volume. Its C library's ``crc32c_extend(crc, data, count)`` takes a pointer; it is
called here through ctypes on the same shared library the ``google_crc32c`` extension loaded (found through the
extension, whose dependencies ``dlsym`` searches), so there is one CRC32C implementation, Google's, hardware
accelerated. Where that symbol cannot be found (an unusual build), the buffer is copied to ``bytes`` instead:
slower, the same value.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import google_crc32c
import numpy as np

log = logging.getLogger(__name__)

IMPLEMENTATION = google_crc32c.implementation  # "c" (hardware CRC32C); "python" is far too slow for volumes


def _c_extend() -> Any:
    if IMPLEMENTATION != "c":
        log.warning("google_crc32c is its pure-Python fallback: sample checksums will dominate the loader's cost")
        return None
    from google_crc32c import _crc32c  # the C extension module

    try:
        fn = ctypes.CDLL(_crc32c.__file__).crc32c_extend
    except (OSError, AttributeError) as exc:
        log.warning("crc32c_extend not found next to google_crc32c's extension (%s); checksums copy each buffer", exc)
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_EXTEND = _c_extend()


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of ``data`` (bytes, or any C-contiguous buffer such as a numpy array), continuing from ``crc``: so
    ``crc32c(b, crc32c(a)) == crc32c(a + b)``."""
    if isinstance(data, bytes):
        return google_crc32c.extend(crc, data)
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("crc32c needs a C-contiguous buffer")
    if _EXTEND is None:
        return google_crc32c.extend(crc, view.tobytes())
    if view.nbytes == 0:
        return crc
    # The address of the buffer's first byte, through numpy (which reads it from the buffer protocol, no copy).
    flat = np.frombuffer(view.cast("B"), dtype=np.uint8)
    return int(_EXTEND(crc, flat.ctypes.data, flat.nbytes))
