"""edgecm profile measures this machine and writes a profile the planner reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgecm_cli
from runtime.planner import list_profiles, load_profile


def test_quick_profile_is_usable_by_the_planner(tmp_path, capsys):
    out = tmp_path / "here.json"
    assert edgecm_cli.main(["profile", "--quick", "--scratch", str(tmp_path), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    profile = load_profile(str(out))
    assert printed["name"] == profile.name and profile.kind == "cpu"
    assert profile.disk_read_gbs > 0 and profile.memory_bandwidth_gbs > 0
    assert all(v > 0 for v in profile.matmul_tflops.values()) and "float32" in profile.matmul_tflops
    assert profile.memory_bytes > profile.reserved_bytes > 0 and "measured" in profile.source
    assert not list(tmp_path.glob("edgecm-profile-*"))  # the disk test file is removed
    assert edgecm_cli.main(["plan", "--shape", "llava-1.5-7b", "--budget", "16GiB", "--profile", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == profile.name

    # supports_bf16 means "computes in bfloat16" (a bfloat16 matmul ran); the speed is a figure beside it.
    rates = printed["matmul_tflops"]
    assert printed["supports_bf16"] == profile.supports_bf16 == ("bfloat16" in rates)
    if "bfloat16" in rates:  # the ratio of the measured rates, which are printed rounded to 0.001
        bf16, fp32, half = rates["bfloat16"], rates["float32"], 0.0005
        assert (bf16 - half) / (fp32 + half) - 0.005 <= printed["bfloat16_matmul_speedup"] <= (
            (bf16 + half) / max(fp32 - half, 1e-9) + 0.005)
    assert "supports_bf16" in printed["notes"] and "speed" in printed["notes"]["supports_bf16"]
    # What it measured for the dtype and what it chose; the engine's default reads that choice from then on.
    choice = printed["dtype_choice"]
    assert printed["default_dtype"] == profile.default_dtype == choice["chosen"] in ("float32", "bfloat16")
    assert choice["reason"] and (choice["gemm_ms"] is None) == (not choice["flags"])
    from runtime.cpu_dtype import cpu_dtype

    assert cpu_dtype().to_json() == choice
    code = edgecm_cli.main(["plan", "--shape", "llava-1.5-7b", "--budget", "16GiB", "--profile", str(out),
                            "--weights", "bfloat16", "--json"])
    assert code == (0 if profile.supports_bf16 else 2)
    capsys.readouterr()


def test_a_shipped_cpu_profile_that_measured_bfloat16_says_it_supports_it():
    measured = [load_profile(name) for name in list_profiles()]
    measured = [p for p in measured if p.kind == "cpu" and p.source.startswith("measured")]
    assert measured
    for profile in measured:
        assert profile.supports_bf16 == ("bfloat16" in profile.matmul_tflops), profile.name


def test_profile_refuses_a_missing_scratch_directory(tmp_path, capsys):
    code = edgecm_cli.main(["profile", "--quick", "--scratch", str(tmp_path / "nope")])
    assert code == 2 and "--scratch" in capsys.readouterr().err


def profile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecm_cli", "profile", "--quick", *args], capture_output=True,
                          text=True, timeout=300)


def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("edgecm: error")]
    return line


@pytest.mark.parametrize("where, message", [
    ("a-file/p.json", "a-file is not a folder"),
    ("deep/er/p.json", "profile makes at most the last folder"),
    ("/dev/null", "--out /dev/null: not a regular file"),  # a rename would replace the device itself
])
def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, where, message):
    (tmp_path / "a-file").write_text("x")
    out = where if where.startswith("/") else str(tmp_path / where)
    done = profile("--scratch", str(tmp_path), "--out", out)
    assert done.returncode == 2 and message in one_error(done.stderr)
    assert "matmul" not in done.stderr and not done.stdout  # nothing was measured
    assert not (tmp_path / "deep").exists() and Path("/dev/null").is_char_device()


def test_only_the_last_missing_folder_is_made_and_a_link_is_written_through(tmp_path):
    target = tmp_path / "profiles" / "mine.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    done = profile("--scratch", str(tmp_path), "--out", str(link))
    assert done.returncode == 0, done.stderr
    assert f"made the folder {target.parent}" in done.stderr
    assert link.is_symlink() and json.loads(target.read_text()) == json.loads(done.stdout)
    assert [p.name for p in target.parent.iterdir()] == ["mine.json"]  # no temporary file left


def test_a_profile_that_cannot_be_written_is_still_printed(tmp_path, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * 64 * 1024)  # the disk is full after the check
    done = profile("--scratch", str(tmp_path), "--out", str(small_disk / "p.json"))
    assert done.returncode == 1
    assert "cannot write the profile (No space left on device); it is printed above" in one_error(done.stderr)
    assert json.loads(done.stdout)["kind"] == "cpu"  # the measurement is not lost
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_scratch_disk_without_room_is_refused_before_measuring(small_disk):
    done = profile("--scratch", str(small_disk))
    assert done.returncode == 2 and "the disk test writes 64 MiB" in one_error(done.stderr)


def test_a_full_stdout_does_not_keep_the_profile_from_its_file(tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m edgecm_cli profile --quick --scratch {tmp_path} "
                           f"--out {out} > /dev/full"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "standard output cannot be written" in one_error(done.stderr)
    assert json.loads(out.read_text())["kind"] == "cpu"
