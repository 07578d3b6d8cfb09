"""Captioning across a Ray cluster with Ray Data: Captioner actors fed by ``map_batches``.

The driver lists the inputs, leaves out those already in the output file, and
streams the rest through ``ray.data.from_items(...).map_batches(CaptionWorker)``:
one actor per GPU on GPU nodes (``num_gpus=1``), or ``workers`` CPU actors
that split the CPUs' threads between them. Each actor loads the model once and
captions its batches with ``runtime.captioning.Captioner``.

Records come back to the driver, which is the only writer of the output file:
one JSON line per image, fsynced, exactly once (a path already written is
never written again, so a batch that Ray retries after a lost actor cannot
double a line). One merged file rather than per-worker parts, because then the
output, its lock, its resume and its format are those of ``edgecm caption``
with no merge step, and writing lines is negligible beside captioning them.

Faults: Ray Data restarts a killed actor and retries the batch it held
(``max_restarts=-1``, ``max_task_retries=-1``); a killed driver is resumed by
running the same command, which skips what the file holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from edgecm.errors import EdgecmError
from edgecm.sampling import SamplingSettings
from edgecm.sparsity import SparsitySettings
from edgecm.video import VideoOptions
from runtime.captioning import CAPTION_NEW_TOKENS, CAPTION_PROMPT, Captioner
from runtime.engine import DEFAULT_DEVICE, Engine, GenerationSettings

RAY_INSTALL = "pip install 'edgecm[ray]'"


def require_ray():
    """Ray Data, or a one-line error naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EdgecmError(f"--ray needs Ray Data, which is not installed; run {RAY_INSTALL} (or pip install 'ray[data]')") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor needs to build its own Captioner: plain values, sent to each worker once.

    The defaults are read off the dataclasses that own them, so they are `edgecm caption`'s.
    """

    model: str | None  # checkpoint directory or .gguf; None: the demo
    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = CAPTION_NEW_TOKENS
    temperature: float = SamplingSettings.temperature
    top_p: float = SamplingSettings.top_p
    seed: int = SamplingSettings.seed
    sparsity: SparsitySettings = field(default_factory=SparsitySettings)
    batch_size: int | str = Captioner.batch_size
    device: str = DEFAULT_DEVICE
    dtype: str | None = None
    budget: str | None = None
    quant: str | None = None
    resident: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float = VideoOptions.fps
    max_frames: int = VideoOptions.max_frames
    folders_are_videos: bool = False
    threads: int = 1  # torch threads per CPU actor
    model_name: str = field(default="", compare=False)


def build_captioner(spec: WorkerSpec):
    """A Captioner for ``spec``, as the CLI builds one."""
    import torch

    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir
    from edgecm.prompt import PromptBuilder

    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    checkpoint = open_checkpoint(spec.model or demo_checkpoint_dir())
    name = spec.model or "demo"
    engine = Engine(checkpoint, device=spec.device, dtype=spec.dtype, resident=spec.resident, budget=spec.budget,
                    quant=spec.quant)
    generation = GenerationSettings(
        max_new_tokens=spec.max_new_tokens,
        sampling=SamplingSettings(temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed),
    )
    return Captioner(
        engine, PromptBuilder(checkpoint, spec.min_pixels, spec.max_pixels), spec.model_name or name,
        prompt=spec.prompt, generation=generation, sparsity=spec.sparsity, batch_size=spec.batch_size,
        video_options=VideoOptions(spec.fps, spec.max_frames), folders_are_videos=spec.folders_are_videos,
    )


class CaptionWorker:
    """The Ray Data actor: builds its Captioner once, then captions batches of paths into JSON records."""

    def __init__(self, spec: WorkerSpec):
        self.captioner = build_captioner(spec)

    def __call__(self, batch: dict) -> dict:
        # Paths travel as the bytes of their names (any file name, UTF-8 or not); records as ASCII JSON text.
        paths = [Path(os.fsdecode(bytes(p))) for p in batch["path"]]
        records = list(self.captioner.caption(paths))
        return {"record": [json.dumps(r) for r in records]}


@dataclass(frozen=True)
class Placement:
    """How many actors run, and what each asks of the cluster."""

    actors: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> str:
        if self.num_gpus:
            return f"{self.actors} actors, one per GPU"
        return f"{self.actors} CPU actors, {int(self.num_cpus)} threads each"


def connect(address: str | None):
    """Join a running cluster (``auto`` or an address), or start a local one (``None``)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address is None:
            ray.init(**options)
        else:
            ray.init(address=address, **options)
    except ConnectionError as exc:
        raise EdgecmError(f"--ray {address}: no Ray cluster there ({exc}); start one with `ray start --head`, "
                          f"or pass --ray alone to start a local one") from None
    return ray


def placement_for(ray, device: str, workers: int | None) -> Placement:
    """One actor per GPU for CUDA; otherwise ``workers`` CPU actors (default: one per 2 CPUs) sharing the CPUs."""
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if device.startswith("cuda"):
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise EdgecmError("--device cuda with --ray: the cluster has no GPU; use --device cpu or add GPU nodes")
        if workers is not None and workers > gpus:
            # Each actor holds one GPU; the actors past the cluster's GPUs would wait for one forever.
            raise EdgecmError(f"--workers {workers}: the cluster has {gpus} GPU{'s' * (gpus != 1)} and each CUDA actor takes one; "
                              f"use at most {gpus}")
        return Placement(actors=workers or gpus, num_cpus=1, num_gpus=1)
    actors = workers or max(1, cpus // 2)
    if actors > cpus:
        raise EdgecmError(f"--workers {actors}: the cluster has {cpus} CPUs; use at most {cpus}")
    return Placement(actors=actors, num_cpus=max(1, cpus // actors), num_gpus=0)


def caption_on_ray(ray, paths: Iterable[Path], spec: WorkerSpec, place: Placement, batch_rows: int) -> Iterator[dict]:
    """Records for ``paths`` as actors finish their batches (in no fixed order)."""
    import ray.data

    items = [{"path": os.fsencode(str(p))} for p in paths]
    if not items:
        return
    blocks = max(1, min(len(items), place.actors * 4))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        CaptionWorker,
        fn_constructor_args=(spec,),
        batch_size=batch_rows,
        batch_format="numpy",
        concurrency=place.actors,
        num_cpus=place.num_cpus,
        num_gpus=place.num_gpus,
        max_restarts=-1,  # a killed actor is started again...
        max_task_retries=-1,  # ...and the batch it held is retried
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["record"]:
            yield json.loads(str(text))
