"""Write examples/moving-shapes.mp4: a red circle crossing a scene from left to right, 4 s at 8 fps.

    python3 examples/make_clip.py [OUT.mp4]

The clip the README's video example uses; made from the shapes world, so it is
reproducible byte for byte on one PyAV version.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import av
    import numpy as np

    from edgecm import scenes

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "moving-shapes.mp4"
    still = scenes.make_scene(scenes.HELD_OUT_SEED_START + 7)  # the backdrop and the objects that stay put
    mover = scenes.SceneObject("circle", "red", "medium", 30.0, 60.0)
    fps, seconds = 8, 4
    with av.open(str(out), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = scenes.IMAGE_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "3"}
        for i in range(fps * seconds):
            x = 30.0 + (scenes.IMAGE_SIZE - 60.0) * i / (fps * seconds - 1)
            frame = replace(still, objects=(replace(mover, cx=x),))
            array = np.asarray(frame.render())
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    print(f"wrote {out} ({out.stat().st_size} bytes, {fps * seconds} frames at {fps} fps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
