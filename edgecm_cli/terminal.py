"""Generated text on its way to a terminal: control characters made visible.

A model can emit any character, and a terminal acts on control characters:
ESC opens sequences that move the cursor, retitle the window or rewrite what
is already on the screen, and ^S (\\x13) stops a terminal's output. So text
shown on a terminal (``run`` and ``show`` when stdout is one, the chat
screen always) has every control character but newline and tab written as
its escape: ``\\x13`` for \\x13. Text to a pipe or a file stays exact, as in
``--json``: a program reading it wants the characters the model produced, and
no terminal acts on them there.
"""

from __future__ import annotations

import re
from typing import TextIO

# C0 controls but tab and newline, DEL, and the C1 controls (some terminals read \x9b as ESC [).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with each control character but newline and tab as a visible ``\\xNN``.

    Character by character, so escaping streamed pieces one at a time gives the same as escaping the whole.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def for_stream(stream: TextIO):
    """The function that readies generated text for ``stream``: escaping for a terminal, exact otherwise."""
    try:
        terminal = stream.isatty()
    except ValueError:  # a closed stream: nothing reaches a terminal through it
        terminal = False
    return escape_controls if terminal else (lambda text: text)
