"""The planner's byte counts against real checkpoints and the engine, and its decisions."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

import edgecm_cli
from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE
from edgecm_cli.plan import SHAPES_DIR
from edgecm.config import load_model_config
from runtime.planner import (
    GiB, Workload, format_min_budget, format_size, largest_batch, list_profiles, load_profile, make_plan, model_sizes,
    parse_bytes,
)
from runtime.engine import Engine, GenerationSettings

GQA_UNTIED = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)


@pytest.mark.parametrize("text, expected", [("12GiB", 12 * GiB), ("12G", 12 * GiB), ("12GB", 12 * 10**9),
                                            ("800MiB", 800 * 2**20), ("1.5 GiB", int(1.5 * GiB)), ("4096", 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["twelve", "12XB", "", "-1G"])
def test_parse_bytes_refuses(bad):
    with pytest.raises(EdgecmError, match="--budget"):
        parse_bytes(bad)


def test_sizes_match_the_checkpoint_and_the_engine(build_llava, image_path):
    model_dir, reference = build_llava(**GQA_UNTIED)
    checkpoint = open_checkpoint(model_dir)
    sizes = model_sizes(checkpoint.config, "float32")
    assert sizes.layer == checkpoint.layer_nbytes(0)  # every tensor of a layer, from the shard headers
    assert sizes.embed == checkpoint.nbytes("embed_tokens.weight") and sizes.head == checkpoint.nbytes("lm_head.weight")
    # vision: the tower's parameters up to the feature layer LLaVA reads, plus the projector
    tower = reference.model.vision_tower
    used = checkpoint.config.vision.clip["num_hidden_layers"] - 1  # feature layer -2
    params = sum(p.numel() for n, p in tower.named_parameters() if "encoder.layers." not in n or int(n.split("encoder.layers.")[1].split(".")[0]) < used)
    params += sum(p.numel() for p in reference.model.multi_modal_projector.parameters())
    assert sizes.vision == 4 * params
    # KV bytes per token: what the engine's cache really holds
    from edgecm.vision import load_image

    prompt = PromptBuilder(checkpoint).build("What is shown?", load_image(image_path))
    result = Engine(checkpoint, dtype="float32").generate(  # the dtype the sizes above were computed in
        prompt, GenerationSettings(max_new_tokens=4, stop_at_eos=False), sparsity=DENSE)
    assert result.memory.kv_cache_bytes == sizes.kv_per_token * (prompt.num_tokens + 3)


def test_a_printed_minimum_budget_is_always_accepted_back():
    rng = random.Random(0)
    sizes = [2129154918, 2 * GiB, 2 * GiB + 1, 644245094, 1025, 1023] + [rng.randrange(1, 64 * GiB) for _ in range(2000)]
    for n in sizes:
        text = format_min_budget(n)
        accepted = parse_bytes(text)
        assert accepted >= n, (n, text)
        value, unit = text.split()
        assert unit == format_size(n).split()[1] and accepted - n <= 0.02 * parse_bytes(f"1 {unit}"), (n, text)
    assert format_min_budget(2129154918) == "1.99 GiB" and format_size(2129154918) == "1.98 GiB"
    assert format_size(parse_bytes("1.99GiB"), "down") == "1.99 GiB"  # a typed figure reads back as typed
    for typed in ("1.99 GiB", "1.29 KiB", "1.01 MiB", "614.40 MiB", "3.33 GiB"):
        assert format_size(parse_bytes(typed), "down") == typed


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecm_cli", "plan", "--shape", "llava-1.5-7b", "--profile", "titan-xp",
                           *args], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_the_minimum_budget_the_plan_command_prints_is_the_one_it_accepts():
    """The exact minimum (2,129,154,918 bytes, 1.983 GiB) printed as 1.98 GiB was once refused as below 1.99 GiB."""
    refused = plan_cli("--budget", "1GiB")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    needed = re.search(r"needs at least ([0-9.]+ [KMG]iB)", refused.stderr).group(1)
    fits = plan_cli("--budget", "4GiB")
    assert fits.returncode == 0, fits.stderr
    printed = re.search(r"smallest workable budget ([0-9.]+ [KMG]iB)", fits.stdout).group(1)
    assert printed == needed == "1.99 GiB"
    exact = json.loads(plan_cli("--budget", "4GiB", "--json").stdout)["min_budget"]
    assert exact == 2129154918
    assert plan_cli("--budget", printed.replace(" ", "")).returncode == 0
    batch = plan_cli("--budget", printed.replace(" ", ""), "--batch-size", "64")
    assert batch.returncode == 2 and re.search(r"a batch of 64 does not fit in 1\.99 GiB .*needs at least", batch.stderr)


def test_decode_residency_follows_the_budget():
    config = load_model_config(SHAPES_DIR / "llava-1.5-7b")
    sizes = model_sizes(config, "float16")
    titan = load_profile("titan-xp")
    plan = make_plan(sizes, titan, 12 * GiB)
    # The specification's arithmetic: attention 4.3 GB + 40 % of FFN 3.5 GB + head, about 8 GB.
    assert plan.decode_resident and 7.3 * GiB < plan.peak("decode") < 8.3 * GiB
    # Prefill streams two 7B layers, not 13 GB, beside the decode set it gathers as it goes.
    gathered = plan.phases["prefill"]["decode set (gathered as prefill goes)"]
    assert plan.peak("prefill") - gathered < 2 * GiB and plan.peak("prefill") <= plan.usable
    tight = make_plan(sizes, titan, 6 * GiB)
    assert not tight.decode_resident and tight.peak("decode") < 6 * GiB
    dense = make_plan(sizes, titan, 12 * GiB, Workload(neuron_fraction=1.0))
    assert not dense.decode_resident  # the dense 7B decode set (13 GB) does not fit in 12 GiB
    with pytest.raises(EdgecmError, match=r"needs at least 1\.99 GiB"):
        make_plan(sizes, titan, 1 * GiB)


def test_a_batch_adds_kv_cache_and_activations_per_sequence():
    config = load_model_config(SHAPES_DIR / "llava-1.5-7b")
    sizes = model_sizes(config, "float16")
    titan = load_profile("titan-xp")
    one, four = make_plan(sizes, titan, 12 * GiB), make_plan(sizes, titan, 12 * GiB, Workload(batch=4))
    assert four.phases["decode"]["KV cache"] == 4 * one.phases["decode"]["KV cache"]
    assert four.phases["prefill"]["activations"] == 4 * one.phases["prefill"]["activations"]
    assert four.phases["decode"]["decode set (attention + core FFN slices)"] == \
        one.phases["decode"]["decode set (attention + core FFN slices)"]  # weights are read once for all


def test_largest_batch_keeps_the_plan_of_one_sequence():
    config = load_model_config(SHAPES_DIR / "llava-1.5-7b")
    sizes = model_sizes(config, "float16")
    titan = load_profile("titan-xp")
    work = Workload(prompt_tokens=620, kept_image_tokens=576, new_tokens=64)
    for budget in (12 * GiB, 6 * GiB):
        n = largest_batch(sizes, titan, budget, work)
        single = make_plan(sizes, titan, budget, work)
        assert n >= 1
        assert make_plan(sizes, titan, budget, replace(work, batch=n)).name == single.name
        try:  # one more either changes the plan or does not fit at all
            assert make_plan(sizes, titan, budget, replace(work, batch=n + 1)).name != single.name
        except EdgecmError:
            pass
    assert largest_batch(sizes, titan, 1 * GiB, work) == 0  # not even one sequence fits


def test_plan_command_sizes_a_batch(capsys):
    base = ["plan", "--shape", "llava-1.5-7b", "--profile", "titan-xp", "--budget", "12GiB", "--json"]
    assert edgecm_cli.main(base) == 0
    one = json.loads(capsys.readouterr().out)
    assert edgecm_cli.main(base + ["--batch-size", "4"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert one["batch"] == 1 and four["batch"] == 4 and one["largest_batch"] == four["largest_batch"] > 4
    assert four["phases"]["decode"]["KV cache"] == 4 * one["phases"]["decode"]["KV cache"]
    assert edgecm_cli.main(base + ["--batch-size", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == one["largest_batch"]


def test_nf4_shrinks_weights_by_about_four():
    config = load_model_config(SHAPES_DIR / "llava-1.5-7b")
    fp16, nf4 = model_sizes(config, "float16"), model_sizes(config, "nf4")
    assert 3.5 < fp16.layer / nf4.layer < 4.0
    assert nf4.kv_per_token == fp16.kv_per_token  # the cache stays in the compute dtype
    # Quantising the resident weights: the 7B decode set fits in 4.5 GiB while prefill streams fp16 layers,
    # and at 6 GiB the whole NF4 model stays.
    titan = load_profile("titan-xp")
    assert not make_plan(fp16, titan, 4.5 * GiB).decode_resident
    plan = make_plan(fp16, titan, 4.5 * GiB, resident=nf4)
    assert plan.decode_resident and not plan.layers_resident
    assert plan.phases["prefill"]["2 streamed layer buffers"] == 2 * fp16.layer
    assert make_plan(fp16, titan, 6 * GiB, resident=nf4).layers_resident


def test_every_shipped_profile_loads():
    names = list_profiles()
    assert {"titan-xp", "rtx-3060", "quadro-rtx-6000", "a100-80gb", "h100-80gb", "generic-cpu"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.memory_bytes > profile.reserved_bytes > 0 and profile.memory_bandwidth_gbs > 0 and profile.source


def test_plan_command(build_llava, tmp_path, capsys):
    assert edgecm_cli.main(["plan", "--shape", "llava-1.5-7b", "--budget", "12GiB", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["decode_resident"] and record["layer_bytes"] == 404766720
    # a directory holding only config.json plans without weights
    config_only = tmp_path / "cfg"
    config_only.mkdir()
    shutil.copy(SHAPES_DIR / "llava-1.5-13b" / "config.json", config_only / "config.json")
    assert edgecm_cli.main(["plan", "--model", str(config_only), "--budget", "24GiB", "--profile", "quadro-rtx-6000"]) == 0
    assert "decode peak" in capsys.readouterr().out
    model_dir, _ = build_llava(**GQA_UNTIED)
    assert edgecm_cli.main(["plan", "--model", str(model_dir), "--budget", "2GiB", "--profile", "generic-cpu", "--weights", "float32"]) == 0
    capsys.readouterr()
    code = edgecm_cli.main(["plan", "--shape", "llava-1.5-13b", "--budget", "2GiB"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs at least" in err
    code = edgecm_cli.main(["plan", "--shape", "llava-1.5-7b", "--budget", "12GiB", "--weights", "bfloat16"])
    assert code == 2 and "no bfloat16" in capsys.readouterr().err
