"""Qwen2.5-VL with a video (a folder of frames) against transformers on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule
from edgecm.video import VideoOptions, read_video
from runtime.engine import Engine, GenerationSettings
from test_qwen2_5_vl import LOGITS_ATOL, MASKED_REFERENCE_ATOL, MODELS, masked_reference

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def setup(build_qwen2_5_vl, frames_dir):
    model_dir, reference = build_qwen2_5_vl(**MODELS["published-untied"])
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(QUESTION, video=read_video(frames_dir))
    return Engine(checkpoint, resident=True), builder, reference, prompt


def reference_inputs(prompt):
    types = (prompt.input_ids == prompt.video_token_id).int() * 2
    return dict(
        input_ids=prompt.input_ids, mm_token_type_ids=types, pixel_values_videos=prompt.video_pixel_values,
        video_grid_thw=prompt.video_grid_thw, second_per_grid_ts=torch.tensor(prompt.second_per_grid_ts),
    )


def test_video_prompt_layout(setup):
    engine, _, _, prompt = setup
    # 4 frames of 64x48 at 2 fps: 2 temporal patches of 6x8 patches, merged 2x2 -> 2 x 12 tokens
    assert prompt.video_grid_thw.tolist() == [[2, 6, 8]]
    assert prompt.second_per_grid_ts == (1.0,)
    assert prompt.image_positions.numel() == 24 and prompt.pixel_values is None


def test_video_positions_match_transformers(setup):
    engine, _, reference, prompt = setup
    inputs = reference_inputs(prompt)
    expected, delta = reference.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
    )
    ours = engine.family.positions(engine.config, prompt, torch.device("cpu"))
    assert torch.equal(ours, expected[:, 0])
    assert engine.family.next_position(engine.config, prompt) == prompt.num_tokens + int(delta)
    video = ours[:, prompt.image_positions]
    assert video[0].unique().tolist() == [video[0, 0].item(), video[0, 0].item() + 2]  # 2 tokens/s x 1 s per patch


def test_video_logits_match_transformers(setup):
    engine, _, reference, prompt = setup
    with torch.inference_mode():
        ours = engine.forward(prompt)
        theirs = reference(**reference_inputs(prompt)).logits
    err = (ours - theirs).abs()
    print(f"video: max logit error {err.max().item():.3e}")
    assert err.max().item() <= LOGITS_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"


def test_video_greedy_tokens_match_transformers_generate(setup):
    import copy

    engine, _, reference, prompt = setup
    ours = engine.generate(prompt, GenerationSettings(max_new_tokens=32, stop_at_eos=False))
    config = copy.deepcopy(reference.generation_config)
    config.eos_token_id, config.pad_token_id = None, 0
    with torch.inference_mode():
        out = reference.generate(**reference_inputs(prompt), generation_config=config, max_new_tokens=32, do_sample=False)
    assert ours.token_ids == out[0, prompt.num_tokens:].tolist()


@pytest.mark.parametrize("tokens", ["knee", "count:5"])
def test_pruned_video_equals_masked_dense_forward(setup, tokens):
    engine, _, _, prompt = setup
    k = 1
    settings = SparsitySettings(tokens=TokenRule.parse(tokens), prune_layer=k, neurons=NeuronBudget("dense"))
    result = engine.generate(
        prompt, GenerationSettings(max_new_tokens=8, stop_at_eos=False), sparsity=settings, collect_logits=True
    )
    n_video = prompt.image_positions.numel()
    print(f"video {tokens}: kept {result.kept_image_tokens} of {n_video} video tokens")
    assert 0 < result.kept_image_tokens < n_video
    dropped = torch.ones(n_video, dtype=torch.bool)
    dropped[result.selection.keep] = False
    with torch.inference_mode():
        reference = masked_reference(engine, prompt, result.token_ids, prompt.image_positions[dropped], k)
    err = (result.logits - reference).abs()
    print(f"video pruned {tokens}: max logit error {err.max().item():.3e}")
    assert err.max().item() <= MASKED_REFERENCE_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"


def test_unreadable_or_empty_videos_are_one_line_errors(tmp_path, image_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, words in ((empty, "no frames"), (tmp_path / "missing", "no such folder"), (image_path, "not decoded")):
        with pytest.raises(EdgecmError, match=words) as err:
            read_video(path)
        assert "\n" not in str(err.value)
    with pytest.raises(EdgecmError, match="fps"):
        read_video(empty, VideoOptions(fps=0))


def test_max_frames_thins_the_clip_evenly(frames_dir):
    video = read_video(frames_dir, VideoOptions(fps=2.0, max_frames=2))
    assert len(video.frames) == 2 and video.fps == 1.0  # same duration, half the frames


def test_run_command_with_a_video(build_qwen2_5_vl, frames_dir, tmp_path, capsys):
    import json

    import edgecm_cli

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    base = ["run", "--model", str(model_dir), "-q", QUESTION, "--max-new-tokens", "4", "--json"]
    assert edgecm_cli.main(base + ["--video", str(frames_dir)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image_tokens"] == 24 and 0 < record["kept_image_tokens"] < 24
    assert edgecm_cli.main(base + ["--video", str(frames_dir), "--max-frames", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens"] == 12
    empty = tmp_path / "none"
    empty.mkdir()
    assert edgecm_cli.main(base + ["--video", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no frames" in err
