"""The CPU's default dtype is measured once per machine, cached, and followed by the engine."""

from __future__ import annotations

import json

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from runtime import cpu_dtype
from runtime.engine import Engine


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECM_HOME", str(tmp_path))
    return tmp_path


def test_the_choice_follows_the_rule_on_what_was_measured():
    choice = cpu_dtype.measure()
    assert choice.chosen in ("float32", "bfloat16") and choice.reason
    if not choice.flags:  # no bfloat16 instructions: nothing is timed, bfloat16 would be emulated
        assert choice.chosen == "float32" and choice.gemm_ms is None
        return
    gemm = choice.gemm_ms["float32"] / choice.gemm_ms["bfloat16"]
    gemv = choice.gemv_ms["float32"] / choice.gemv_ms["bfloat16"]
    fast = gemm >= cpu_dtype.GEMM_SPEEDUP_NEEDED and gemv >= 1.0
    assert choice.chosen == ("bfloat16" if fast else "float32"), choice


def test_the_choice_is_measured_once_and_then_read_from_the_cache(home, build_llama):
    first = cpu_dtype.cpu_dtype()
    cached = json.loads((home / cpu_dtype.CACHE_FILE).read_text())
    assert cached[first.key]["chosen"] == first.chosen
    # A planted entry for this CPU is what comes back, so nothing was measured again; and the engine follows it.
    other = "float32" if first.chosen == "bfloat16" else "bfloat16"
    cached[first.key] = {**cached[first.key], "chosen": other, "reason": "planted"}
    (home / cpu_dtype.CACHE_FILE).write_text(json.dumps(cached))
    assert cpu_dtype.cpu_dtype().reason == "planted"
    model_dir, _ = build_llama(gqa=True, tied=True)
    assert Engine(open_checkpoint(model_dir)).dtype == getattr(torch, other)
    assert Engine(open_checkpoint(model_dir), dtype="float32").dtype == torch.float32  # --dtype wins


def test_a_damaged_cache_is_measured_again_and_rewritten(home):
    (home / cpu_dtype.CACHE_FILE).write_text("{ not json")
    choice = cpu_dtype.cpu_dtype()
    assert json.loads((home / cpu_dtype.CACHE_FILE).read_text())[choice.key]["chosen"] == choice.chosen


def test_the_cli_says_once_that_it_measured_the_cpu(home, build_llama, capsys):
    import edgecm_cli

    model_dir, _ = build_llama(gqa=True, tied=True)
    said = []
    for _ in range(2):
        assert edgecm_cli.main(["run", "--model", str(model_dir), "-q", "Hi", "--max-new-tokens", "2"]) == 0
        said.append([line for line in capsys.readouterr().err.splitlines() if "measured this CPU" in line])
    assert len(said[0]) == 1 and said[1] == []
    choice = cpu_dtype.cpu_dtype()
    assert f"compute dtype: {choice.chosen} (" in said[0][0] and str(home) in said[0][0]
