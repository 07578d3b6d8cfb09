"""The captions file of ``edgecm caption``: one descriptor for the lock, the resume and the appends.

OUT is opened once. That descriptor is locked (``flock``), read back, cut and appended to, so the lock
and the resume agree on one identity, the file's inode: a second run that reaches the same file through
a symlink, a hard link or another spelling of its path takes the same lock and is refused. The kernel
releases the lock when its process dies, so a killed run never blocks the next.

- A file that is not a captions file (its lines are not caption records) is refused before anything is
  written, and left byte for byte as it was.
- Every line is written whole, then fsynced, before the next one; a write that fails (a full disk) is
  cut back to the last whole line, so the file always ends whole.
- On start a torn last line (a kill, a power loss) is cut off and that image redone.
- An image's last line is its result. Without ``--retry-errors`` any path in the file is done; with it,
  a path whose last line is an error is captioned again and its new line appended after the old one
  (which stays: nothing written is ever removed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgecm.errors import EdgecmError

# Every record this module writes starts with these bytes; a torn tail that does not is not ours.
RECORD_START = b'{"path": '


class CaptionsFileError(EdgecmError):
    """A line could not be written (the disk is full, an I/O error); the file still ends in a whole line."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Contents:
    """What a captions file holds: each path's last line, caption or error."""

    last_is_error: dict[str, bool] = field(default_factory=dict)

    def done(self, retry_errors: bool) -> set[str]:
        """The paths a run skips: all of them, or (retrying errors) those whose last line is a caption."""
        return {p for p, error in self.last_is_error.items() if not (retry_errors and error)}

    @property
    def errors(self) -> int:
        """Images whose last line is an error."""
        return sum(self.last_is_error.values())


def lock_holder(fd: int) -> int | None:
    """The pid holding an flock on the file open as ``fd``, from /proc/locks (Linux); None if unknown."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "FLOCK" in fields and "->" not in fields:  # "->" marks a waiter, not the holder
                    at = fields.index("FLOCK")
                    if len(fields) > at + 4 and fields[at + 4] == key:
                        return int(fields[at + 3])
    except (OSError, ValueError):
        return None
    return None


def holder_of(path: Path) -> int | None:
    """The pid of the edgecm caption writing ``path`` (any path to it), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return lock_holder(fd)
    finally:
        os.close(fd)


class CaptionsFile:
    """OUT, opened, locked and read back; ``append`` adds one record."""

    def __init__(self, out: Path):
        self.out = out
        self.locked = False
        self.fd, self.created = self._open(out)
        try:
            self._lock()
            self.contents = self._recover()
        except BaseException:
            self.close()
            raise

    # -- opening and locking ---------------------------------------------------------------------

    @staticmethod
    def _open(out: Path) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK  # never wait on a FIFO's other end
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, created = os.open(out, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(out, flags), False
                except FileNotFoundError:  # a symlink to a file not made yet: make its target
                    fd, created = os.open(out, flags | os.O_CREAT, 0o644), True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise EdgecmError(f"--out {out}: a symbolic link that loops; point it at a file, or pass another "
                                  f"--out") from None
            if exc.errno in (errno.EISDIR, errno.ENXIO):
                raise EdgecmError(f"--out {out}: not a regular file; pass a path for the captions file "
                                  f"(.jsonl)") from None
            raise EdgecmError(f"--out {out}: cannot write in {out.parent} ({exc.strerror}); pass --out a path in a "
                              f"writable folder") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise EdgecmError(f"--out {out}: not a regular file; pass a path for the captions file (.jsonl)")
        os.set_blocking(fd, True)
        return fd, created

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except BlockingIOError:
            owner = lock_holder(self.fd)
            who = f"another edgecm caption (pid {owner})" if owner else "another edgecm caption"
            raise EdgecmError(f"--out {self.out}: {who} is writing this file (through this path or another link "
                              f"to it); wait for that run to finish or pass another --out") from None

    # -- reading back ----------------------------------------------------------------------------

    def _read_all(self) -> bytes:
        size = os.fstat(self.fd).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(self.fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _recover(self) -> Contents:
        """Each path's last line; a torn last line is cut off so the file parses again.

        Everything is checked before anything is changed: a file whose complete lines are not caption
        records, or whose unfinished tail is not the start of one, is not ours, and is refused untouched.
        """
        data = self._read_all()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        contents = Contents()
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                contents.last_is_error[record["path"]] = "error" in record
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise EdgecmError(
                    f"{self.out}:{number}: not a caption line, so this is not an edgecm captions file; it was left "
                    f"as it is. Pass a new --out (or repair that line)"
                ) from None
        tail = data[end:]
        if tail and not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
            raise EdgecmError(
                f"{self.out}: does not end in a caption line, so this is not an edgecm captions file; it was left as "
                f"it is. Pass a new --out"
            )
        if tail:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            print(f"edgecm: {self.out}: dropped a torn last line ({len(tail)} bytes); that image is redone",
                  file=sys.stderr)
        return contents

    # -- writing -----------------------------------------------------------------------------------

    def same_file(self, path: Path) -> bool:
        """Whether ``path`` is this file (any link to it)."""
        try:
            st, mine = os.stat(path), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def append(self, record: dict) -> None:
        """Write one record as a whole line and fsync it; a failed write is cut back off."""
        line = json.dumps(record, ensure_ascii=False)
        try:
            data = (line + "\n").encode("utf-8")
        except UnicodeEncodeError:
            # A file name that is not valid UTF-8 holds surrogate escapes (Python's view of its raw
            # bytes); JSON's \\udcXX escapes record them losslessly and json.loads gives them back.
            data = (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as exc:
            try:  # shrinking needs no space: the half-written line goes, the lines before it stay
                os.ftruncate(self.fd, start)
                os.fsync(self.fd)
            except OSError:
                pass  # the next run cuts a torn tail anyway
            reason = exc.strerror or errno.errorcode.get(exc.errno, str(exc))
            raise CaptionsFileError(f"{self.out}: cannot write ({reason})", reason) from None
        self.contents.last_is_error[record["path"]] = "error" in record

    def close(self) -> None:
        """Release the lock; a file this run created and never wrote to is removed again."""
        if self.fd < 0:
            return
        # Only while the lock is held: unlocked, the file may be another run's, which locked it first.
        if self.locked and self.created and os.fstat(self.fd).st_size == 0:
            target = Path(os.path.realpath(self.out))  # the file made, not a symlink naming it
            if self.same_file(target):
                try:
                    target.unlink()
                except OSError:
                    pass  # left empty: harmless, and a later run resumes it
        os.close(self.fd)  # closing the descriptor releases the lock
        self.fd = -1
