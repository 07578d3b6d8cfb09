"""Reading a user's text file (prompts, a calibration set) line by line, or refusing it in one line.

A binary file handed over by mistake (an image, a checkpoint shard) must be named as such instead of
raising UnicodeDecodeError; a UTF-8 byte-order mark, which some editors write, is not part of the first
line (it used to turn a JSON first line into plain text).
"""

from __future__ import annotations

from pathlib import Path

from edgecm.errors import EdgecmError


def read_lines(path: Path, fix: str) -> list[str]:
    """The lines of the UTF-8 text file ``path``; ``fix`` says what the file should be, for the refusal."""
    data = path.read_bytes()
    if b"\0" in data:
        raise EdgecmError(f"{path}: a binary file, not text (it holds NUL bytes); {fix}")
    try:
        text = data.decode("utf-8-sig")  # drops a leading byte-order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EdgecmError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it as UTF-8, "
                          f"or {fix}") from None
    return text.splitlines()
