"""The local runner's SDK worker process: Beam's own worker (``sdk_worker_main``), bound to the life of its driver.

Started by the FnApiRunner that ``beam_jobs.runner.make_runner`` builds, never by hand::

    exec python -m beam_jobs.local_worker <driver pid>

Beam's multi-processing workers outlive a driver that is killed: each finishes its bundle, writing shards for
15-20 s more. Here the worker asks the kernel to send it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
Linux), however the parent dies, SIGKILL included. The parent is the driver thread that started the worker and
waits for it, so it lives exactly as long as the worker should. Elsewhere the worker runs unbound.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bind_to_parent(parent_pid: int) -> None:
    """Die with the parent; exit now if it already died between the fork and this call."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)  # orphaned already: the signal will never come


def main(argv: list[str]) -> None:
    bind_to_parent(int(argv[1]))
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(argv[:1])


if __name__ == "__main__":
    main(sys.argv)
