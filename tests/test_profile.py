"""edgecm profile measures this machine and writes a profile the planner reads."""

from __future__ import annotations

import json

import edgecm_cli
from runtime.planner import load_profile


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


def test_profile_refuses_a_missing_scratch_directory(tmp_path, capsys):
    code = edgecm_cli.main(["profile", "--quick", "--scratch", str(tmp_path / "nope")])
    assert code == 2 and "--scratch" in capsys.readouterr().err
