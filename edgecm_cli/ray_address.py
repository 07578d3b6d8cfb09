"""``--ray ADDRESS``: checked before anything starts, and joined within a bounded wait.

Ray's own connect retries for minutes against an address where no cluster answers, logging warnings
that name the node's address instead of the one given, and it blocks inside C++ where neither Ctrl-C
nor SIGTERM is seen until its next retry (tens of seconds). So:

- the address is parsed first (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``; a port outside 1..65535 or a
  web address is refused at once);
- a plain TCP connect to HOST:PORT, bounded by the timeout, tells "nothing is listening" in
  milliseconds;
- ``ray.init`` then runs under a watchdog thread that, past the timeout or on SIGINT/SIGTERM (read from
  the signal wakeup fd, which the C-level handler writes at once), says so in one line and ends the
  process. Nothing has been written by then; ``cleanup`` lets the caller drop what it made (an empty
  captions file) first.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from edgecm.errors import EdgecmError

RAY_CONNECT_TIMEOUT_S = 15.0
FORMS = "auto, HOST:PORT as `ray start --head` prints it (e.g. 127.0.0.1:6379), or nothing to start a local cluster"


def check_address(text: str) -> tuple[str, int] | None:
    """(host, port) to reach for ``text``; None for ``auto`` and ``local`` (the bare flag)."""
    if text in ("auto", "local"):
        return None
    if text.startswith(("http://", "https://")):
        raise EdgecmError(f"--ray {text}: a web address (the dashboard's?), not the cluster's; give {FORMS}")
    host, colon, port = text.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not colon or not host:
        raise EdgecmError(f"--ray {text!r}: give {FORMS}")
    try:
        number = int(port)
    except ValueError:
        raise EdgecmError(f"--ray {text}: {port!r} is not a port number; give {FORMS}") from None
    if not 1 <= number <= 65535:
        raise EdgecmError(f"--ray {text}: port {number} is not a TCP port (1 to 65535); give {FORMS}")
    return host, number


def check_timeout(seconds: float) -> float:
    if not seconds > 0:
        raise EdgecmError(f"--ray-timeout {seconds:g}: must be more than 0 seconds")
    return seconds


def probe(text: str, target: tuple[str, int], timeout: float) -> None:
    """Refuse an address where nothing listens, without Ray's minutes of retries."""
    try:
        socket.create_connection(target, timeout=timeout).close()
    except socket.timeout:
        raise EdgecmError(f"--ray {text}: no answer within {timeout:g} s; check the address (ray status shows "
                          f"it), or raise --ray-timeout") from None
    except OSError as exc:
        raise EdgecmError(f"--ray {text}: cannot connect ({exc.strerror or exc}); no Ray cluster listens there. "
                          f"Start one with `ray start --head --port {target[1]}`, or pass --ray alone to start a "
                          f"local one") from None


@contextmanager
def bounded_wait(text: str, timeout: float, cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Run the block (``ray.init``) for at most ``timeout`` seconds, Ctrl-C and SIGTERM still heard.

    Python runs signal handlers in the main thread only, and the main thread is inside C++ here; but the
    C-level handler writes each signal's number to the wakeup fd at once, from whichever thread the kernel
    chose, so the watchdog reads them there (SIGINT has edgecm's handler, SIGTERM Ray's, installed as
    ray.init starts; before that SIGTERM still has its default, immediate action).
    """
    main = threading.current_thread() is threading.main_thread()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False) if main else None
    done = threading.Event()

    def end(line: str, code: int) -> None:
        print(line, file=sys.stderr, flush=True)
        cleanup()
        os._exit(code)  # the main thread is inside C++ and cannot be reached another way

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                end(f"edgecm: error: --ray {text}: no Ray cluster answered within {timeout:g} s; check the address "
                    f"(ray status shows it), or raise --ray-timeout", 2)
            ready, _, _ = select.select([wake_read], [], [], min(left, 0.1))
            for number in os.read(wake_read, 64) if ready else b"":
                if number == signal.SIGINT:
                    end("\nedgecm: interrupted", 130)
                if number == signal.SIGTERM:
                    end(f"edgecm: terminated while connecting to Ray at {text}; nothing was written", 143)

    watcher = threading.Thread(target=watch, name="ray-connect-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if main:
            signal.set_wakeup_fd(previous)
        os.close(wake_read)
        os.close(wake_write)
