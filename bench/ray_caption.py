"""Captioning on Ray against one plain process: images/s on the demo, and Ray's own cost per image.

    python3 bench/ray_caption.py [--demo-images 12,36] [--tiny-images 16,256]

A two-CPU Ray head is started here (``ray start --head --num-cpus 2``) and
stopped at the end. Every run is the real command, ``edgecm caption`` with or
without ``--ray``, timed from start to exit, on a fresh output file:

- the demo: one process (2 threads) against two CPU actors (1 thread each),
  on held-out scenes of the shapes world;
- a tiny random LLaVA (the tests' model), where captioning itself is cheap, so
  what is left is Ray's overhead.

Each configuration runs at two corpus sizes; the slope between them is the
cost per image and the intercept the fixed cost (loading, cluster and actor
start-up). Ray's per-image overhead is its slope minus the plain command's.
Writes ray-caption-<device>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
RAY = str(Path(sys.executable).with_name("ray"))


def write_scenes(folder: Path, count: int) -> Path:
    from edgecm import scenes

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scenes.make_scene(scenes.HELD_OUT_SEED_START + 70_000 + i).render().save(folder / f"scene{i:03d}.png")
    return folder


def write_test_images(folder: Path, count: int) -> Path:
    from tiny import write_test_image

    for i in range(count):
        write_test_image(folder / f"img{i:03d}.png", 32 + i % 32)
    return folder


def timed_caption(inputs: Path, model: str | None, extra: list[str], max_new_tokens: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "captions.jsonl"
        command = [sys.executable, "-m", "edgecm_cli", "caption", str(inputs), "--out", str(out),
                   "--max-new-tokens", str(max_new_tokens), *extra]
        if model:
            command += ["--model", model]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=ENV)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1]}")
        lines = out.read_text().count("\n")
    return seconds, lines


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(seconds per image, fixed seconds) through the two points."""
    slope = (seconds[1] - seconds[0]) / (sizes[1] - sizes[0])
    return slope, seconds[0] - slope * sizes[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-images", default="12,36")
    # Far apart: on the tiny model an image costs milliseconds, so nearer sizes differ by less than the noise.
    ap.add_argument("--tiny-images", default="16,256")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from tiny import tiny_llava

    from edgecm.demo import demo_checkpoint_dir

    # Built here, untimed: new vision weights build a new demo on first use, which is not captioning's cost.
    demo_checkpoint_dir()
    work = Path(tempfile.mkdtemp(prefix="edgecm-ray-bench."))
    tiny_dir = work / "tiny"
    tiny_llava(tiny_dir, gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=ENV)
    address = f"127.0.0.1:{port}"
    models = []
    try:
        for name, model, sizes, make, configs in (
            ("demo", None, [int(n) for n in args.demo_images.split(",")], write_scenes,
             {"one process, 2 threads": [], "Ray, 2 CPU actors x 1 thread": ["--ray", address, "--workers", "2"]}),
            ("tiny random LLaVA", str(tiny_dir), [int(n) for n in args.tiny_images.split(",")],
             write_test_images,
             {"one process, 2 threads": [], "Ray, 2 CPU actors x 1 thread": ["--ray", address, "--workers", "2"]}),
        ):
            rows = []
            for label, extra in configs.items():
                times = []
                for n in sizes:
                    folder = work / f"{name.split()[0]}-{n}"
                    folder.mkdir(exist_ok=True)
                    make(folder, n)
                    seconds, lines = timed_caption(folder, model, extra, args.max_new_tokens)
                    assert lines == n, f"{label}: {lines} lines for {n} images"
                    times.append(seconds)
                    print(f"  {name}, {label}, {n} images: {seconds:.1f} s ({n / seconds:.2f} images/s)",
                          file=sys.stderr, flush=True)
                per_image, fixed = fit(sizes, times)
                rows.append({"config": label, "sizes": sizes, "seconds": times, "per_image_s": per_image,
                             "fixed_s": fixed, "images_per_s_steady": 1 / per_image if per_image > 0 else None})
            plain = rows[0]["per_image_s"]
            for row in rows[1:]:
                row["ray_overhead_per_image_s"] = row["per_image_s"] - plain
            models.append({"model": name, "rows": rows})
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)
    device = f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    report = {"device": device, "max_new_tokens": args.max_new_tokens,
              "command": "python3 bench/ray_caption.py " + " ".join(sys.argv[1:]), "models": models}
    lines = [f"# Captioning on Ray against one process, on {device}", "",
             f"`{report['command']}`; the real `edgecm caption` command timed from start to exit, {args.max_new_tokens} "
             f"new tokens at most per image, a two-CPU Ray head started for the run. Per image and fixed seconds "
             f"come from two corpus sizes (slope and intercept).", ""]
    for model in models:
        lines += [f"## {model['model']}", "", "| configuration | images | seconds | steady images/s | fixed s | "
                  "Ray overhead per image |", "|---|---|---|---|---|---|"]
        for r in model["rows"]:
            overhead = r.get("ray_overhead_per_image_s")
            # A slope at or below zero means the larger corpus did not take longer: noise, not a rate.
            steady = r["images_per_s_steady"]
            lines.append(f"| {r['config']} | {' / '.join(map(str, r['sizes']))} | "
                         f"{' / '.join(f'{t:.1f}' for t in r['seconds'])} | "
                         f"{'under the noise' if steady is None else f'{steady:.2f}'} | {r['fixed_s']:.1f} | "
                         f"{'-' if overhead is None else f'{overhead * 1000:+.0f} ms'} |")
        lines.append("")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ray-caption-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"ray-caption-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
