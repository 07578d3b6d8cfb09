"""Ctrl-C that always reads as Ctrl-C.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT
arrives. Inside some torch C functions (building a tensor from a Python
list, for one) the interrupt surfaces as another exception instead, such as
a ValueError about an object's shape, which an ``except KeyboardInterrupt``
misses: the user who pressed Ctrl-C would get a traceback. The handler
installed here notes that SIGINT came before raising, so an error that
follows it can be told for what it is.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_received = False


def _on_sigint(signum, frame) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


@contextmanager
def noting_interrupts():
    """SIGINT raises KeyboardInterrupt as usual inside this block, and is remembered; the old handler returns after."""
    global _received
    _received = False
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C, or an error raised in its place after SIGINT arrived."""
    return isinstance(exc, KeyboardInterrupt) or _received
