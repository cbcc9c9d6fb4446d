"""Output buffers reused across calls once nothing views them any more.

A ``predict`` call's maps and masks are large (8 x 2048 x 2048 float32 is
134 MB): allocated afresh every call, the kernel has to page-fault and zero
them before the untile and normalize kernels can write, which cost more than
the kernels themselves at batch 8 (issue #21). :class:`LeasePool` hands out
arrays whose memory goes back to the pool only when the last array viewing it
is gone, so the results a caller still holds are never overwritten, and a
caller that drops its results (the usual loop) gets the same memory back next
call, already mapped.

How: every handed-out array views its buffer through a small owner object
(:class:`_Lease`, numpy's ``base``); every view of the array, and every view
of a view, keeps that owner alive. When the owner is freed, its ``__del__``
puts the buffer back on the idle list. (A ``weakref.finalize`` did that
before: about a quarter of a ``take`` right after the models ran, when
the interpreter's objects are out of the caches; docs/cpu_speed.md.)
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

Allocate = Callable[[tuple[int, ...], str], np.ndarray]
"""``allocate(shape, dtype)``: an uninitialized C-contiguous array (``np.empty`` or :meth:`LeasePool.take`)."""


def fresh(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The default :data:`Allocate`: ``np.empty(shape, dtype)``."""
    return np.empty(shape, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _dtype(dtype: str) -> np.dtype[Any]:
    """``np.dtype(dtype)``, looked up once per name."""
    return np.dtype(dtype)


class _Lease:
    """Owner of one pooled buffer while arrays handed out view it (their numpy ``base``).

    Args:
        view: What the arrays see (the buffer, or a view of its first bytes).
        buffer: The pooled buffer, given back to ``give`` when the lease is freed.
        give: Called with ``buffer`` from :meth:`__del__`, at any point of any thread (it must not lock).
    """

    __slots__ = ("__array_interface__", "buffer", "give")

    def __init__(self, view: np.ndarray, buffer: np.ndarray, give: Callable[[np.ndarray], None]) -> None:
        self.buffer = buffer
        self.give = give
        self.__array_interface__: dict[str, Any] = view.__array_interface__

    def __del__(self) -> None:
        self.give(self.buffer)


class LeasePool:
    """Arrays whose memory returns to the pool when nothing views it any more.

    :meth:`take` returns an uninitialized C-contiguous array; unlike a pool with
    an explicit give-back, the caller may hand it (or views of it) to users:
    the buffer is reused only after every view is gone. Thread-safe: a buffer
    in use is never idle, so concurrent calls get different buffers.

    Args:
        keep: Idle buffers held at most (the least recently returned dropped
            first); a buffer beyond it is freed.
    """

    FIT = 2
    """An idle buffer serves a request of another shape when it has at most this many times the bytes needed."""

    TRIM_BYTES = 1 << 20
    """A request of at least this many bytes that no idle buffer serves drops the idle buffers smaller than it."""

    def __init__(self, keep: int = 4) -> None:
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep: expected a non-negative integer, got {keep!r}")
        self.keep = keep
        self._idle: OrderedDict[int, tuple[tuple[tuple[int, ...], str], np.ndarray]] = OrderedDict()
        self._returned: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # reentrant: leases put here
        self._lock = threading.Lock()
        self._closed = False

    def _give(self, buffer: np.ndarray) -> None:
        # Runs from a lease's __del__, at any point of any thread: no lock here (SimpleQueue.put is reentrant).
        if not self._closed:
            self._returned.put(buffer)

    def _collect(self) -> None:
        """Move returned buffers to the idle list and trim it to ``keep`` (lock held)."""
        returned = self._returned
        while not returned.empty():  # the one consumer (the lock is held): puts only add, so get never waits
            buffer = returned.get_nowait()
            self._idle[id(buffer)] = ((buffer.shape, buffer.dtype.str), buffer)
        while len(self._idle) > self.keep:
            self._idle.popitem(last=False)

    def take(self, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
        """An uninitialized C-contiguous array of this shape and dtype: an idle buffer when one fits, else new.

        An idle buffer of the same shape and dtype is taken first; else the smallest idle buffer of at
        least the bytes needed and at most :attr:`FIT` times them (its first bytes, viewed as this
        shape and dtype): so buffers of different stages of a call share memory (the backbone's
        features, once the heads are done with them, hold the image-size maps). When nothing fits
        a request of at least :attr:`TRIM_BYTES`, the idle buffers smaller than it are dropped:
        after a larger batch the smaller batch's buffers are not kept beside the larger ones (a
        smaller batch then reuses a larger buffer within :attr:`FIT`, or allocates once).

        Args:
            shape: The array's shape.
            dtype: Its dtype.

        Returns:
            An array whose buffer comes back to this pool once it and every view of it are gone.
        """
        kind = _dtype(dtype)
        key = (tuple(int(d) for d in shape), kind.str)
        need = math.prod(key[0]) * kind.itemsize
        buffer = None
        with self._lock:
            self._collect()
            fits = [
                (candidate.nbytes, ident)
                for ident, (k, candidate) in self._idle.items()
                if k == key or need <= candidate.nbytes <= self.FIT * max(need, 1)
            ]
            exact = [ident for ident, (k, _) in reversed(self._idle.items()) if k == key]
            if exact or fits:
                buffer = self._idle.pop(exact[0] if exact else min(fits)[1])[1]
        if buffer is None and need >= self.TRIM_BYTES:
            with self._lock:  # a larger request than the idle buffers serve: the smaller ones are left behind
                for ident in [i for i, (_, b) in self._idle.items() if b.nbytes < need]:
                    del self._idle[ident]
        if buffer is None:
            buffer = np.empty(key[0], dtype=key[1])
        view = buffer
        if (buffer.shape, buffer.dtype.str) != key:
            view = buffer.reshape(-1).view(np.uint8)[:need].view(key[1]).reshape(key[0])
        return self._lease(view, buffer)

    def _lease(self, view: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        """``view`` as an array whose owner gives ``buffer`` back to this pool when it is freed."""
        out: np.ndarray = np.asarray(_Lease(view, buffer, self._give))
        return out

    @property
    def idle(self) -> int:
        """Idle buffers held now."""
        with self._lock:
            self._collect()
            return len(self._idle)

    @property
    def idle_bytes(self) -> int:
        """Bytes of the idle buffers held now."""
        with self._lock:
            self._collect()
            return sum(buffer.nbytes for _, buffer in self._idle.values())

    def close(self) -> None:
        """Drop every idle buffer; buffers in use are freed when their views go, not pooled again."""
        with self._lock:
            self._closed = True
            self._collect()
            self._idle.clear()
