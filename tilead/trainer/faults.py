"""Fault injection for tests: a location's fit can end its process once, as a crash would.

With ``TILEAD_FAULT_EXIT_LOCATION=<name>`` and ``TILEAD_FAULT_FLAG=<file>`` in the workers' environment, the
first attempt to fit that location ends its process after its first tile batch (the flag file records that it
happened); a retry runs through. :mod:`tilead.trainer.distributed`'s tests use it.
"""

from __future__ import annotations

import os

FAULT_LOCATION_ENV = "TILEAD_FAULT_EXIT_LOCATION"


FAULT_FLAG_ENV = "TILEAD_FAULT_FLAG"


def maybe_inject_fault(location: str) -> None:
    """Test hook: end this process (no cleanup, no exception) on the first attempt at ``location``.

    Active only when both environment variables are set; the flag file marks that the fault happened.
    """
    if os.environ.get(FAULT_LOCATION_ENV) != location:
        return
    flag = os.environ.get(FAULT_FLAG_ENV)
    if not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # a retry: run through
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)
