"""One command that checks a GPU: every CUDA path of edgecm, each step under its own time limit.

    python3 bench/gpu_check.py [--out bench/results] [--scratch /tmp/edgecm-bench] [--steps NAME,...] [--list]

The steps, in order (``--list`` prints them with their limits, which add up
to at most eight minutes):

1. weights: a LLaVA-1.5-7B-shaped checkpoint with random float16 weights,
   initialised on the GPU and written once as safetensors shards into
   --scratch; every later step reads it (a finished one is reused);
2. tests: the CUDA-marked tests (tests/test_cuda.py and the GPU cases of
   test_exactness.py and test_runtime.py): each CUDA path against the CPU;
3. scale: at 7B under a 12 GiB budget, sampling (alone and in a batch with
   a seed per sequence), then NF4 and int8 weights, through the library;
4. runtime: bench/runtime.py --device cuda for the 7B shape under 12 GiB,
   edgecm dense, CoreMatching and CoreMatching NF4 against transformers with
   accelerate offload;
5. throughput: bench/throughput.py's GPU variant at batch 1 and 8.

Each step runs in its own process group, killed at its limit, so a slow or
hung step cannot eat the time of the ones after it. NVML is read before and
after each step and polled while it runs (peak memory used on the card by
every process, power, utilisation). Writes gpu-check-<device>.json, .md and
.log to --out, beside the benchmarks' own runtime-* and throughput-* files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOTAL_LIMIT_S = 8 * 60
BUDGET = "12GiB"  # a 12 GB card's, as on a Titan Xp or an RTX 3060
SHAPE = "llava-1.5-7b"
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_exactness.py", "tests/test_runtime.py"]


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    what: str
    argv: tuple[str, ...]


def steps(args) -> list[Step]:
    python = sys.executable
    scratch, out = str(args.scratch), str(args.out)
    me = str(Path(__file__).resolve())
    return [
        Step("weights", 75, f"random {SHAPE} float16 checkpoint, made on the GPU, written as shards",
             (python, me, "--worker", "weights", "--scratch", scratch)),
        Step("tests", 90, "the CUDA-marked tests against the CPU path",
             (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfs", *CUDA_TESTS)),
        Step("scale", 75, f"7B under {BUDGET}: sampling alone and batched, NF4, int8",
             (python, me, "--worker", "scale", "--scratch", scratch)),
        Step("runtime", 140, f"bench/runtime.py, 7B under {BUDGET}: edgecm dense, CoreMatching (+NF4) against "
             "transformers + accelerate offload",
             (python, str(ROOT / "bench" / "runtime.py"), "--device", "cuda", "--budget", BUDGET, "--only", "llava",
              "--repeats", "1", "--new-tokens", "32", "--scratch", scratch, "--out", out, "--variants",
              "edgecm dense,edgecm corematching,edgecm corematching nf4,transformers offload")),
        Step("throughput", 100, f"bench/throughput.py's GPU variant at batch 1 and 8 under {BUDGET}",
             (python, str(ROOT / "bench" / "throughput.py"), "--device", "cuda", "--only", "llava-7b", "--budget",
              BUDGET, "--batches", "1,8", "--images", "8", "--new-tokens", "8", "--scratch", scratch, "--out", out)),
    ]


# -- NVML, read by this process without creating a CUDA context of its own --------------------------


def visible_handle(pynvml, visible: str | None = None):
    """NVML's handle of the card the steps run on: the first of CUDA_VISIBLE_DEVICES (an index or a UUID),
    as CUDA numbers them, since NVML's own index 0 is the first card of the machine whatever that says."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    first = (visible or "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(first)
    return pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)


def nvml_reading() -> dict:
    """The card's memory used (all processes), power and utilisation now; {} without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = visible_handle(pynvml)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        reading = {"memory_used_bytes": int(memory.used), "memory_total_bytes": int(memory.total)}
        for key, read in (("power_watts", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
                          ("gpu_utilization_percent", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                          ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, 0))):
            try:
                reading[key] = read()
            except pynvml.NVMLError:
                reading[key] = None
        return reading
    except Exception as exc:  # noqa: BLE001 - NVML missing or failing must not stop the check; it is reported
        return {"error": f"NVML: {exc}"}


def nvml_device() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = visible_handle(pynvml)
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        return {"name": text(pynvml.nvmlDeviceGetName(handle)),
                "driver_version": text(pynvml.nvmlSystemGetDriverVersion())}
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return {"error": f"NVML: {exc}"}


class NvmlPoller:
    """Peaks of NVML's readings while a step runs, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.5, read=nvml_reading):
        self.interval_s, self.read = interval_s, read
        self.peaks: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                if isinstance(value, (int, float)) and key != "memory_total_bytes":
                    self.peaks[f"max_{key}"] = max(self.peaks.get(f"max_{key}", value), value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "NvmlPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- the step runner ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    limit_s: int
    status: str  # passed, failed, timeout
    seconds: float
    returncode: int | None
    tail: list[str] = field(default_factory=list)
    nvml: dict = field(default_factory=dict)


def run_step(step: Step, log, read=nvml_reading, env: dict | None = None) -> Outcome:
    """Run ``step`` in a process group of its own, killed whole at its limit; its output goes to ``log``."""
    log.write(f"\n===== {step.name} (limit {step.limit_s} s): {' '.join(step.argv)}\n")
    log.flush()
    before = read()
    started = time.perf_counter()
    lines: list[str] = []
    with NvmlPoller(read=read) as poller:
        process = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=ROOT, start_new_session=True, env={**os.environ, **(env or {})})

        def pump() -> None:
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=step.limit_s)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step and every process it started
            process.wait()
            status = "timeout"
        reader.join(timeout=5)
    seconds = time.perf_counter() - started
    log.write(f"===== {step.name}: {status} in {seconds:.1f} s\n")
    return Outcome(step.name, step.limit_s, status, seconds, process.returncode, lines[-15:],
                   {"before": before, "after": read(), **poller.peaks})


# -- the two steps that are this script's own ------------------------------------------------------------


def bench_module(name: str):
    """A bench script as a module (bench/runtime.py's name is taken by the runtime package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_config() -> dict:
    config = json.loads((ROOT / "edgecm" / "data" / "shapes" / SHAPE / "config.json").read_text())
    config["torch_dtype"] = "float16"  # what a 12 GiB card without bfloat16 (Titan Xp) runs
    return config


def make_weights(scratch: Path, config: dict, device: str = "cuda") -> dict:
    started = time.perf_counter()
    path = bench_module("runtime").make_random_vlm(config, scratch / SHAPE, device)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"path": str(path), "bytes": size, "seconds": time.perf_counter() - started}


def scale(scratch: Path, config: dict, device: str = "cuda", budget: str = BUDGET) -> dict:
    """Sampling, NF4 and int8 at 7B under the 12 GiB budget, through the library as a user calls it."""
    import torch

    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import Prompt
    from edgecm.sampling import SamplingSettings
    from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule
    from runtime.batch import generate_batch
    from runtime.engine import Engine, GenerationSettings

    checkpoint = open_checkpoint(scratch / SHAPE)
    ids, image = bench_module("runtime").vlm_inputs(config)
    prompt = Prompt(input_ids=ids, text="", **image)
    sparsity = SparsitySettings(tokens=TokenRule("count", 64), neurons=NeuronBudget("beta", 0.4))
    rows = {}

    def record(name: str, engine: Engine, results: list) -> None:
        first = results[0]
        rows[name] = {"tokens": [r.token_ids for r in results], "plan": first.memory.plan,
                      "prefill_s": first.timings.time_to_answer_s, "decode_tokens_per_s": first.timings.decode_tokens_per_s,
                      "device_peak_allocated_bytes": first.memory.device_peak_allocated_bytes,
                      "decode_set_bytes": first.memory.decode_set_bytes, "budget_bytes": engine.budget}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)

    def sampled(seed: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=16, stop_at_eos=False,
                                  sampling=SamplingSettings(temperature=0.7, top_p=0.9, seed=seed))

    engine = Engine(checkpoint, device=device, budget=budget)
    record("sampled float16", engine, [engine.generate(prompt, sampled(1), sparsity=sparsity)])
    again = engine.generate(prompt, sampled(1), sparsity=sparsity).token_ids
    rows["sampled float16"]["same seed, same tokens"] = again == rows["sampled float16"]["tokens"][0]
    record("sampled batch of 2, seeds 1 and 2", engine,
           generate_batch(engine, [prompt, prompt], [sampled(1), sampled(2)], sparsity=sparsity))
    for quant in ("nf4", "int8"):
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
        engine = Engine(checkpoint, device=device, budget=budget, quant=quant)
        greedy = GenerationSettings(max_new_tokens=16, stop_at_eos=False)
        record(f"{quant} greedy", engine, [engine.generate(prompt, greedy, sparsity=sparsity)])
    return rows


# -- the report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    gib = 1024**3
    lines = [f"# GPU check on {report['device'].get('name', 'an unnamed GPU')}", "",
             f"`{report['command']}`; driver {report['device'].get('driver_version', '?')}, torch {report['torch']}, "
             f"{report['finished']}; limits add up to {report['limit_s']} s, the run took {report['seconds']:.0f} s. "
             "Memory is NVML's (every process on the card), peak over the step.", "",
             "| step | what | status | seconds (limit) | peak memory used GiB | max power W | last line |",
             "|---|---|---|---|---|---|---|"]
    for o in report["steps"]:
        peak = o["nvml"].get("max_memory_used_bytes")
        power = o["nvml"].get("max_power_watts")
        last = next((line for line in reversed(o["tail"]) if line.strip()), "").replace("|", "\\|")[:160]
        lines.append(f"| {o['name']} | {o['what']} | {o['status']} | {o['seconds']:.0f} ({o['limit_s']}) | "
                     f"{'-' if peak is None else f'{peak / gib:.1f}'} | {'-' if power is None else f'{power:.0f}'} | "
                     f"{last} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/edgecm-bench"))
    parser.add_argument("--steps", help="comma-separated names of the steps to run (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the steps and their time limits, run nothing")
    parser.add_argument("--worker", choices=("weights", "scale"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = make_weights if args.worker == "weights" else scale
        result = worker(args.scratch, shape_config())
        print("RESULT " + json.dumps(result))
        return 0
    plan = steps(args)
    names = [s.name for s in plan]
    if args.steps:
        chosen = [n.strip() for n in args.steps.split(",")]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            print(f"gpu_check: --steps {', '.join(unknown)}: no such step; use some of {', '.join(names)}",
                  file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in chosen]
    if args.list:
        for s in plan:
            print(f"{s.name:<11} {s.limit_s:>4} s  {s.what}")
        print(f"{'total':<11} {sum(s.limit_s for s in plan):>4} s")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = nvml_device()
    slug = re.sub(r"[^a-z0-9]+", "-", device.get("name", "gpu").lower()).strip("-")
    started = time.perf_counter()
    outcomes = []
    with open(args.out / f"gpu-check-{slug}.log", "w") as log:
        for step in plan:
            print(f"gpu_check: {step.name} (limit {step.limit_s} s) ...", file=sys.stderr, flush=True)
            outcome = run_step(step, log)
            print(f"gpu_check: {step.name}: {outcome.status} in {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
            outcomes.append({**outcome.__dict__, "what": step.what, "command": " ".join(step.argv)})
            report = {"device": device, "torch": torch.__version__, "command": "python3 bench/gpu_check.py "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
                      "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "limit_s": sum(s.limit_s for s in plan), "seconds": time.perf_counter() - started,
                      "steps": outcomes}
            # Written after every step, so a run cut short still leaves what it measured.
            (args.out / f"gpu-check-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / f"gpu-check-{slug}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(o["status"] == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
