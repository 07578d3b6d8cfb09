"""Write a tiny Qwen2.5-VL checkpoint with random weights into DIR, as published checkpoints are laid out.

    python3 examples/make_tiny_qwen2_5_vl.py DIR

It is the model the Qwen2.5-VL exactness tests build (tests/tiny.py): 3 decoder
layers 64 wide, a 2-block windowed tower, a small tokenizer. Its answers are
noise; it is for trying the Qwen2.5-VL paths (images, video, pruning, plan,
show) without a real checkpoint, which cannot be downloaded everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python3 examples/make_tiny_qwen2_5_vl.py DIR", file=sys.stderr)
        return 2
    from tiny import tiny_qwen2_5_vl

    out = Path(sys.argv[1])
    tiny_qwen2_5_vl(out, layout="published")
    print(f"wrote a tiny random Qwen2.5-VL checkpoint to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
