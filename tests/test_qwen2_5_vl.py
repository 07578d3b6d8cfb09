"""Qwen2.5-VL against transformers on tiny random checkpoints: logits, greedy tokens, 3-D positions,
and CoreMatching against a masked dense reference."""

from __future__ import annotations

import copy

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.config import load_model_config
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.vision import load_image
from reference import masked_reference
from runtime.engine import Engine, GenerationSettings
from runtime.planner import model_sizes

# Dense float32 on CPU: the same operations as transformers in the same order, except that the
# attention runs through SDPA with a different mask path; round-off only.
LOGITS_ATOL = 1e-4
# Masked full attention and compacted attention sum the same terms in a different order.
MASKED_REFERENCE_ATOL = 1e-4
GREEDY_TOKENS = 32
QUESTION = "Describe the picture in one sentence."

MODELS = {
    "published-untied": dict(layout="published", tied=False),
    "published-tied-sharded": dict(layout="published", tied=True, sharded=True),
    "v5-untied-sharded": dict(layout="v5", tied=False, sharded=True),
    "v5-tied": dict(layout="v5", tied=True),
}


@pytest.fixture(scope="module")
def loaded(build_qwen2_5_vl):
    """name -> (engine, builder, reference model), each built and opened once."""
    cache = {}

    def load(name: str):
        if name not in cache:
            model_dir, reference = build_qwen2_5_vl(**MODELS[name])
            checkpoint = open_checkpoint(model_dir)
            cache[name] = Engine(checkpoint, dtype="float32", resident=True), PromptBuilder(checkpoint), reference
        return cache[name]

    return load


def make_prompt(builder, kind, image_path, wide_image_path):
    image = {"text": None, "square": image_path, "wide": wide_image_path}[kind]
    return builder.build(QUESTION, None if image is None else load_image(image))


def reference_inputs(prompt, image_token_id):
    inputs = {"input_ids": prompt.input_ids, "mm_token_type_ids": (prompt.input_ids == image_token_id).int()}
    if prompt.pixel_values is not None:
        inputs.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    return inputs


@pytest.mark.parametrize("kind", ["text", "square", "wide"])
@pytest.mark.parametrize("name", list(MODELS))
def test_dense_logits_match_transformers(loaded, name, kind, image_path, wide_image_path):
    engine, builder, reference = loaded(name)
    prompt = make_prompt(builder, kind, image_path, wide_image_path)
    if kind != "text":
        assert prompt.image_positions.numel() > 0
    with torch.inference_mode():
        ours = engine.forward(prompt)
        theirs = reference(**reference_inputs(prompt, engine.config.image_token_id)).logits
    err = (ours - theirs).abs()
    print(f"{name} {kind}: max logit error {err.max().item():.3e}")
    assert err.max().item() <= LOGITS_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"


@pytest.mark.parametrize("kind", ["text", "wide"])
@pytest.mark.parametrize("name", ["published-untied", "v5-tied"])
def test_greedy_tokens_match_transformers_generate(loaded, name, kind, image_path, wide_image_path):
    engine, builder, reference = loaded(name)
    prompt = make_prompt(builder, kind, image_path, wide_image_path)
    ours = engine.generate(prompt, GenerationSettings(max_new_tokens=GREEDY_TOKENS, stop_at_eos=False), sparsity=DENSE)
    config = copy.deepcopy(reference.generation_config)
    config.eos_token_id = None  # both sides run the full length
    config.pad_token_id = 0
    with torch.inference_mode():
        out = reference.generate(
            **reference_inputs(prompt, engine.config.image_token_id), generation_config=config,
            max_new_tokens=GREEDY_TOKENS, do_sample=False,
        )
    theirs = out[0, prompt.num_tokens:].tolist()
    assert len(theirs) == GREEDY_TOKENS
    assert ours.token_ids == theirs


@pytest.mark.parametrize("kind", ["square", "wide"])
def test_positions_and_rope_delta_match_transformers(loaded, kind, image_path, wide_image_path):
    engine, builder, reference = loaded("published-untied")
    prompt = make_prompt(builder, kind, image_path, wide_image_path)
    inputs = reference_inputs(prompt, engine.config.image_token_id)
    expected, delta = reference.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    ours = engine.family.positions(engine.config, prompt, torch.device("cpu"))
    assert torch.equal(ours, expected[:, 0])
    assert engine.family.next_position(engine.config, prompt) == prompt.num_tokens + int(delta)
    assert engine.family.next_position(engine.config, prompt) < prompt.num_tokens  # images pack positions


def test_patch_grid_of_a_wide_image_and_pixel_limits(loaded, wide_image_path):
    engine, builder, _ = loaded("published-untied")
    prompt = make_prompt(builder, "wide", None, wide_image_path)
    rows, cols = engine.family.patch_grid(engine.config, prompt)
    assert (rows, cols) == (3, 6)  # 96x48 pixels, 16 pixels per merged token
    assert rows * cols == prompt.image_positions.numel()
    small = PromptBuilder(engine.checkpoint, max_pixels=16 * 16 * 8).build(QUESTION, load_image(wide_image_path))
    assert small.image_positions.numel() < prompt.image_positions.numel()
    assert small.image_positions.numel() <= 8


def test_planner_counts_the_vision_tower(loaded):
    engine, _, reference = loaded("published-untied")
    tower = sum(p.numel() for p in reference.model.visual.parameters())
    sizes = model_sizes(engine.config, "float32", "float32")
    assert sizes.vision == tower * 4


@pytest.mark.parametrize("tokens", ["count:6", "knee"])
def test_pruned_engine_equals_masked_dense_forward(loaded, tokens, wide_image_path):
    engine, builder, _ = loaded("v5-untied-sharded")
    prompt = make_prompt(builder, "wide", None, wide_image_path)
    k = 1
    settings = SparsitySettings(tokens=TokenRule.parse(tokens), prune_layer=k, neurons=NeuronBudget("dense"))
    result = engine.generate(
        prompt, GenerationSettings(max_new_tokens=12, stop_at_eos=False), sparsity=settings, collect_logits=True
    )
    n_image = prompt.image_positions.numel()
    assert 0 < result.kept_image_tokens < n_image
    if tokens == "count:6":
        assert result.kept_image_tokens == 6
    dropped_image = torch.ones(n_image, dtype=torch.bool)
    dropped_image[result.selection.keep] = False
    with torch.inference_mode():
        reference = masked_reference(engine, prompt, result.token_ids, prompt.image_positions[dropped_image], k)
    err = (result.logits - reference).abs()
    print(f"pruned {tokens}: max logit error {err.max().item():.3e}")
    assert err.max().item() <= MASKED_REFERENCE_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"
    dense = engine.generate(
        prompt, GenerationSettings(max_new_tokens=12, stop_at_eos=False), sparsity=SparsitySettings(mode="dense"),
        collect_logits=True,
    )
    assert (dense.logits - reference).abs().max().item() > 100 * MASKED_REFERENCE_ATOL
    compact = prompt.num_tokens - n_image + result.kept_image_tokens + 12 - 1
    assert set(result.kv_cache_tokens) == {compact}


def test_neuron_sparsity_runs_on_qwen(loaded, image_path):
    engine, builder, _ = loaded("published-untied")
    prompt = make_prompt(builder, "square", image_path, None)
    settings = SparsitySettings(neurons=NeuronBudget("beta", 0.4))
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=6, stop_at_eos=False), sparsity=settings)
    assert len(result.token_ids) == 6
    assert result.core_neurons == [64] * engine.text.num_layers  # ceil(0.4 * 160)
    assert 0 < result.kept_image_tokens < result.image_tokens


def test_flat_and_nested_configs_read_the_same(build_qwen2_5_vl):
    flat_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    nested_dir, _ = build_qwen2_5_vl(**MODELS["v5-untied-sharded"])
    flat, nested = load_model_config(flat_dir), load_model_config(nested_dir)
    assert flat == nested
    assert flat.family == "qwen2_5_vl" and flat.text.attention_bias and not flat.text.tie_word_embeddings
    assert flat.text.rope.mrope_section == (2, 3, 3) and flat.text.rope.rope_type == "default"
    assert load_model_config(build_qwen2_5_vl(**MODELS["published-tied-sharded"])[0]).text.tie_word_embeddings


@pytest.mark.parametrize("tokens, rank", [("knee", "fastv"), ("count:4", "random"), ("ratio:0.5", "core"),
                                          ("count:5", "core-ref")])
def test_token_rules_complete_on_qwen(loaded, tokens, rank, wide_image_path):
    engine, builder, _ = loaded("published-untied")
    prompt = make_prompt(builder, "wide", None, wide_image_path)
    settings = SparsitySettings(tokens=TokenRule.parse(tokens), token_rank=rank)
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=4, stop_at_eos=False), sparsity=settings)
    n_image = prompt.image_positions.numel()
    expected = {"count:4": 4, "count:5": 5, "ratio:0.5": n_image // 2}.get(tokens, result.kept_image_tokens)
    assert result.kept_image_tokens == expected
    assert 0 < result.kept_image_tokens < n_image
    assert set(result.kv_cache_tokens) == {prompt.num_tokens - n_image + result.kept_image_tokens + 3}


def test_run_command_with_pixel_limits(build_qwen2_5_vl, wide_image_path, capsys):
    import json

    import edgecm_cli

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    base = ["run", "--model", str(model_dir), "--image", str(wide_image_path), "-q", QUESTION,
            "--max-new-tokens", "4", "--json"]
    assert edgecm_cli.main(base) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["image_tokens"] == 18
    assert edgecm_cli.main(base + ["--max-pixels", str(16 * 16 * 8)]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens"] <= 8
    assert edgecm_cli.main(base + ["--min-pixels", "5000", "--max-pixels", "4000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-pixels 5000 is above --max-pixels 4000" in err


@pytest.mark.parametrize("shape, layers, kv_per_token, tied", [
    ("qwen2.5-vl-3b", 36, 2 * 36 * 2 * 128 * 2, True), ("qwen2.5-vl-7b", 28, 2 * 28 * 4 * 128 * 2, False),
])
def test_plan_published_shapes(shape, layers, kv_per_token, tied, capsys):
    import json

    import edgecm_cli
    from edgecm_cli.plan import SHAPES_DIR

    assert edgecm_cli.main(["plan", "--shape", shape, "--budget", "12GiB", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kv_bytes_per_token"] == kv_per_token  # K and V, float16, the models' KV heads
    config = load_model_config(SHAPES_DIR / shape)
    assert config.text.num_layers == layers and config.text.tie_word_embeddings == tied
    assert "vision" in record["phases"]


def test_model_view_rebuilds_the_image_from_its_patches(loaded, wide_image_path):
    engine, builder, _ = loaded("published-untied")
    prompt = make_prompt(builder, "wide", None, wide_image_path)
    view = engine.family.model_view(engine.config, prompt, builder.processor)  # (3, H, W)
    import numpy as np

    original = torch.from_numpy(np.asarray(load_image(wide_image_path), dtype=np.float32))  # 96x48: no resize needed
    original = original.permute(2, 0, 1) / 255
    assert view.shape == (3, 48, 96)
    assert (view - original).abs().max().item() < 1e-5


def test_show_frames_exactly_the_kept_tokens_of_a_wide_image(build_qwen2_5_vl, wide_image_path, tmp_path, capsys):
    from PIL import Image

    import edgecm_cli
    from edgecm_cli.show import KEPT_FRAME, PATCH_SCALE

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    out = tmp_path / "show.png"
    code = edgecm_cli.main(["show", "--model", str(model_dir), "--image", str(wide_image_path), "-q", QUESTION,
                            "--out", str(out), "--tokens", "count:5", "--max-new-tokens", "4"])
    assert code == 0 and out.is_file()
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build(QUESTION, load_image(wide_image_path))
    result = Engine(checkpoint, dtype="float32").generate(
        prompt, GenerationSettings(max_new_tokens=4), sparsity=SparsitySettings(tokens=TokenRule.parse("count:5"))
    )
    picture = Image.open(out).convert("RGB")
    cell, header, (rows, cols) = 16 * PATCH_SCALE, 58, (3, 6)  # edgecm_cli.show.render's header rows
    framed = {i for i in range(rows * cols)
              if picture.getpixel(((i % cols) * cell + cell // 2, header + (i // cols) * cell)) == KEPT_FRAME}
    assert framed == set(result.selection.keep.tolist())
    assert "kept 5 of 18" in capsys.readouterr().out


@pytest.mark.parametrize("height, width, max_pixels", [(720, 1280, 12845056), (720, 1280, 401408), (37, 500, 50000),
                                                       (3000, 20, 1003520), (10, 10, 12845056)])
def test_planner_resize_rule_is_the_processors(height, width, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    from edgecm.families.qwen2_5_vl import smart_resize

    assert smart_resize(height, width, 28, 3136, max_pixels) == reference(height, width, 28, 3136, max_pixels)


def pixel_run(model_dir, image, *flags) -> "subprocess.CompletedProcess":
    """`edgecm run` under an 8 GB address-space limit: a resize that allocated first would die, not refuse."""
    import shlex
    import subprocess
    import sys

    command = shlex.join([sys.executable, "-m", "edgecm_cli", "run", "--model", str(model_dir), "--image", str(image),
                          "-q", QUESTION, "--max-new-tokens", "2", *flags])
    return subprocess.run(["bash", "-c", f"ulimit -v 8000000; {command}"], capture_output=True, text=True,
                          timeout=300)


def test_min_pixels_past_the_largest_image_is_refused_before_the_model_opens(image_path, tmp_path):
    done = pixel_run(tmp_path / "never-opened", image_path, "--min-pixels", "4000000000", "--max-pixels",
                     "99999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("edgecm: error: --min-pixels 4,000,000,000: every image would be scaled up to at "
                                   "least that, past the 64,000,000 pixels edgecm takes in one image; use at most "
                                   "64000000")


def test_an_upscale_past_the_context_is_refused_with_its_numbers(build_qwen2_5_vl, image_path):
    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    done = pixel_run(model_dir, image_path, "--min-pixels", "60000000", "--max-pixels", "99999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert ("a 48x48 image would be resized to 7760x7760 (60,217,600 pixels, 235,225 image tokens), past the "
            "model's context of 512 tokens") in done.stderr


def test_an_upscale_past_the_largest_image_is_refused_before_it_is_made(build_qwen2_5_vl, tmp_path):
    """With a context long enough to take it, the 64-megapixel bound is what refuses the upscaled size."""
    import json
    import shutil

    from PIL import Image

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    long_context = tmp_path / "long-context"
    shutil.copytree(model_dir, long_context)
    config = json.loads((long_context / "config.json").read_text())
    config["max_position_embeddings"] = 10**9
    (long_context / "config.json").write_text(json.dumps(config))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (9000, 1000), (30, 90, 200)).save(wide)  # 9 megapixels: the file itself is allowed
    done = pixel_run(long_context, wide, "--min-pixels", "64000000", "--max-pixels", "99999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "a 9000x1000 image would be resized to 24000x2672 (64,128,000 pixels" in done.stderr
    assert "past the 64,000,000 pixels edgecm takes in one image" in done.stderr


def test_a_video_past_the_context_is_refused_and_names_max_frames(build_qwen2_5_vl, frames_dir, tmp_path):
    import subprocess
    import sys

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    done = subprocess.run([sys.executable, "-m", "edgecm_cli", "run", "--model", str(model_dir), "--video",
                           str(frames_dir), "-q", QUESTION, "--min-pixels", "100000"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "a 64x48 video would be resized to 368x288 (105,984 pixels a frame, 4 frames, 828 video tokens)" in done.stderr
    assert "or --max-frames" in done.stderr


def test_the_chatml_reference_token_is_the_last_im_start(loaded, image_path):
    """core-ref reads the first token of the assistant's header: in ChatML, its ``<|im_start|>``."""
    _, builder, _ = loaded("v5-tied")
    prompt = builder.build(QUESTION, load_image(image_path))
    ids = prompt.input_ids[0].tolist()
    start = builder.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[prompt.reference_index] == start
    assert start not in ids[prompt.reference_index + 1:]  # the last one: the assistant's, not the user's
    tail = builder.tokenizer.decode(ids[prompt.reference_index:], skip_special_tokens=False)
    assert tail.strip() == "<|im_start|>assistant"
