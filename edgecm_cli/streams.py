"""Standard streams that are closed, full or gone, as a shell can hand them over.

- A closed descriptor (``>&-``, ``2>&-``, ``<&-``) is pointed at /dev/null before anything else runs:
  otherwise the next file opened (a captions file, a lock) takes its number, and whatever writes to
  "stdout" afterwards (a library, a child process) writes into that file. A command whose product is
  on stdout (``run``'s answer, ``plan``'s table), or that reads stdin (``chat``), is refused instead,
  before any work.
- stdout that cannot be written (``> /dev/full``, a disk that fills) raises ``StdoutError``, which the
  CLI ends with one line; a reader that left (``| head``) keeps its own quiet handling.
- stderr that cannot be written is dropped: it only carries notices and stats, there is nowhere left to
  report its failure, and a caption run must not die of a full log.
"""

from __future__ import annotations

import errno
import os
import sys

from edgecm.errors import EdgecmError

STREAM_NAMES = {0: "standard input", 1: "standard output", 2: "standard error"}


class StdoutError(EdgecmError):
    """stdout refused a write (full, or an I/O error): what was to be printed is lost."""


def reserve_closed_streams() -> set[int]:
    """Point every closed descriptor among 0, 1 and 2 at /dev/null; return the ones that were closed."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    # Python set these to None at start-up; print(file=None) writes to stdout, so stats would land there.
    if 1 in closed:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- lives as long as the process
    if 2 in closed:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    return closed


def refuse_closed(command: str, closed: set[int], writes_stdout: bool) -> None:
    """Refuse a command that would lose its product to a closed stdout, or read a closed stdin."""
    if 1 in closed and writes_stdout:
        raise EdgecmError(f"{STREAM_NAMES[1]} is closed (>&-), so what {command} prints would go nowhere; "
                          f"open it, e.g. > out.txt, or > /dev/null to discard it")
    if 0 in closed and command == "chat":
        raise EdgecmError(f"{STREAM_NAMES[0]} is closed (<&-), and chat reads your messages from it; run it in a "
                          f"terminal, or pipe the messages in (echo hi | edgecm chat)")


def detach(fd: int) -> None:
    """Point ``fd`` at /dev/null, so Python's flush at exit does not fail a second time."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


class _Guarded:
    """A text stream whose write failures are handled as above; everything else is the stream's own."""

    def __init__(self, stream, fd: int):
        self._stream, self._fd = stream, fd
        self._dropped = False

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _call(self, method, *args):
        if self._dropped:
            return len(args[0]) if args else None
        try:
            return method(*args)
        except BrokenPipeError:
            raise  # the reader left: the CLI's quiet handling, exit 141
        except OSError as exc:
            if self._fd == 2:
                self._dropped = True
                detach(2)
                return len(args[0]) if args else None
            detach(1)
            self._dropped = True
            reason = exc.strerror or errno.errorcode.get(exc.errno, str(exc))
            raise StdoutError(f"{STREAM_NAMES[1]} cannot be written ({reason}), so the output is lost; send it "
                              f"where there is room, e.g. > out.txt on a disk with free space") from None

    def write(self, text: str) -> int:
        return self._call(self._stream.write, text)

    def flush(self) -> None:
        self._call(self._stream.flush)


def guard_streams() -> None:
    """Install the write handling on sys.stdout and sys.stderr (once)."""
    if sys.stdout is not None and not isinstance(sys.stdout, _Guarded):
        sys.stdout = _Guarded(sys.stdout, 1)
    if sys.stderr is not None and not isinstance(sys.stderr, _Guarded):
        sys.stderr = _Guarded(sys.stderr, 2)
