"""bench/gpu_check.py's parts that run without a GPU: its steps and their limits, the step runner, the refusal."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def no_nvml() -> dict:
    return {}


def test_the_steps_fit_in_eight_minutes_and_cover_what_a_gpu_must_run(gpu_check, tmp_path):
    args = type("Args", (), {"scratch": tmp_path, "out": tmp_path})
    plan = gpu_check.steps(args)
    assert [s.name for s in plan] == ["weights", "tests", "scale", "runtime", "throughput"]
    assert sum(s.limit_s for s in plan) <= gpu_check.TOTAL_LIMIT_S == 480
    commands = {s.name: " ".join(s.argv) for s in plan}
    assert "-m gpu" in commands["tests"] and "tests/test_cuda.py" in commands["tests"]
    assert "--device cuda --budget 12GiB --only llava" in commands["runtime"]
    assert "edgecm corematching" in commands["runtime"] and "transformers offload" in commands["runtime"]
    assert "--batches 1,8" in commands["throughput"]
    for step in plan:  # every step writes under --out and reads the shared weights in --scratch
        assert str(tmp_path) in commands[step.name] or step.name == "tests"


def test_list_prints_the_limits_and_runs_nothing():
    done = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1].split()[:2] == ["total", "480"]


def test_without_a_gpu_it_refuses_in_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_step_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "tests,nope"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--steps nope: no such step" in done.stderr


def test_a_step_past_its_limit_is_killed_with_its_children_and_the_next_one_runs(gpu_check, tmp_path):
    marker = tmp_path / "child-alive"
    # The step starts a child that would write the marker after 3 s; killing the group must stop it too.
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    script = tmp_path / "slow.py"
    script.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\n"
                      "print('started', flush=True)\ntime.sleep(30)\n")
    slow = gpu_check.Step("slow", 1, "sleeps", (sys.executable, str(script)))
    fine = gpu_check.Step("fine", 10, "prints", (sys.executable, "-c", "print('ok')"))
    failing = gpu_check.Step("failing", 10, "fails", (sys.executable, "-c", "import sys; sys.exit('broken input')"))
    log = io.StringIO()
    started = time.perf_counter()
    outcomes = [gpu_check.run_step(s, log, read=no_nvml) for s in (slow, fine, failing)]
    assert [o.status for o in outcomes] == ["timeout", "passed", "failed"]
    assert outcomes[0].seconds < 5 and time.perf_counter() - started < 15
    assert outcomes[0].tail == ["started"] and outcomes[1].tail == ["ok"] and outcomes[2].tail == ["broken input"]
    time.sleep(3.5)
    assert not marker.exists(), "the timed-out step's child outlived it"
    text = log.getvalue()
    assert "===== slow: timeout" in text and "===== fine: passed" in text and "===== failing: failed" in text


def test_the_report_names_each_step_and_its_nvml_peaks(gpu_check):
    report = {"device": {"name": "NVIDIA H200", "driver_version": "580"}, "torch": "2.11", "command": "c",
              "finished": "now", "limit_s": 480, "seconds": 100.0,
              "steps": [{"name": "tests", "what": "w", "status": "passed", "seconds": 50.0, "limit_s": 90,
                         "tail": ["18 passed | ok"], "nvml": {"max_memory_used_bytes": 3 * 1024**3,
                                                             "max_power_watts": 250.0}}]}
    text = gpu_check.markdown(report)
    assert "# GPU check on NVIDIA H200" in text
    assert "| tests | w | passed | 50 (90) | 3.0 | 250 | 18 passed \\| ok |" in text


def test_nvml_reads_the_card_cuda_runs_on(gpu_check):
    """NVML numbers every card of the machine; the steps run on CUDA_VISIBLE_DEVICES' first (index or UUID)."""

    class Handles:  # pynvml's two lookups, answering with what they were asked
        def nvmlDeviceGetHandleByUUID(self, uuid):
            return ("uuid", uuid)

        def nvmlDeviceGetHandleByIndex(self, index):
            return ("index", index)

    assert gpu_check.visible_handle(Handles(), "GPU-5a1b,GPU-77") == ("uuid", "GPU-5a1b")
    assert gpu_check.visible_handle(Handles(), "3,1") == ("index", 3)
    assert gpu_check.visible_handle(Handles(), "") == ("index", 0)
