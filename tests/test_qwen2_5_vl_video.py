"""Qwen2.5-VL with a video (a folder of frames, or a video file) against transformers on a tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.video import VideoOptions, read_video
from runtime.engine import Engine, GenerationSettings
from reference import masked_reference
from test_qwen2_5_vl import LOGITS_ATOL, MASKED_REFERENCE_ATOL, MODELS
from tiny import write_test_video

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def setup(build_qwen2_5_vl, frames_dir):
    model_dir, reference = build_qwen2_5_vl(**MODELS["published-untied"])
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(QUESTION, video=read_video(frames_dir))
    return Engine(checkpoint, dtype="float32", resident=True), builder, reference, prompt


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
    ours = engine.generate(prompt, GenerationSettings(max_new_tokens=32, stop_at_eos=False), sparsity=DENSE)
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


@pytest.fixture(scope="module")
def video_file(frames_dir, tmp_path_factory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("clip") / "clip.mkv", frames_dir, fps=2)


def test_a_lossless_video_file_reads_as_its_frames(video_file, frames_dir):
    from_file, from_folder = read_video(video_file), read_video(frames_dir)
    assert from_file.fps == from_folder.fps == 2.0
    assert [f.tobytes() for f in from_file.frames] == [f.tobytes() for f in from_folder.frames]


def test_a_video_file_is_sampled_at_fps_from_its_timestamps(frames_dir, tmp_path):
    clip = write_test_video(tmp_path / "clip.mkv", frames_dir, fps=4)  # 4 frames at 4 fps: one second
    folder = [f.tobytes() for f in read_video(frames_dir).frames]
    half = read_video(clip, VideoOptions(fps=2.0))
    assert half.fps == 2.0 and [f.tobytes() for f in half.frames] == folder[::2]
    # Above the clip's own rate every frame is taken once, at the clip's rate: frames are never invented.
    every = read_video(clip, VideoOptions(fps=10.0))
    assert every.fps == 4.0 and [f.tobytes() for f in every.frames] == folder
    thinned = read_video(clip, VideoOptions(fps=4.0, max_frames=2))
    assert thinned.fps == 2.0 and len(thinned.frames) == 2


def test_a_compressed_video_file_decodes(frames_dir, tmp_path):
    clip = write_test_video(tmp_path / "clip.mp4", frames_dir, fps=2, codec="mpeg4")
    video = read_video(clip)
    assert len(video.frames) == 4 and video.frames[0].size == (64, 48) and video.fps == 2.0


def test_video_file_prompt_matches_transformers(setup, video_file):
    engine, builder, reference, _ = setup
    prompt = builder.build(QUESTION, video=read_video(video_file))
    with torch.inference_mode():
        err = (engine.forward(prompt) - reference(**reference_inputs(prompt)).logits).abs()
    assert prompt.video_grid_thw.tolist() == [[2, 6, 8]]
    assert err.max().item() <= LOGITS_ATOL, f"max {err.max().item():.3e}"


def test_unreadable_or_empty_videos_are_one_line_errors(tmp_path, image_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video " * 20)
    cases = ((empty, "no frames"), (tmp_path / "missing", "no such video file or folder"),
             (image_path, "still image"), (tmp_path / "zero.mp4", "file is empty"),
             (tmp_path / "junk.mp4", "cannot be decoded as a video"))
    for path, words in cases:
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
    clip = write_test_video(tmp_path / "clip.mkv", frames_dir)
    assert edgecm_cli.main(base + ["--video", str(clip)]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == record["token_ids"]  # lossless: same frames, same answer
    empty = tmp_path / "none"
    empty.mkdir()
    assert edgecm_cli.main(base + ["--video", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no frames" in err
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 300)
    assert edgecm_cli.main(base + ["--video", str(tmp_path / "broken.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be decoded as a video" in err


def test_chat_attaches_a_video_to_the_next_turn(build_qwen2_5_vl, frames_dir, image_path, tmp_path):
    import io

    from rich.console import Console

    import edgecm_cli
    from edgecm_cli.chat import Chat

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    args = edgecm_cli.build_parser().parse_args(["chat", "--model", str(model_dir), "--max-new-tokens", "3"])
    out = io.StringIO()
    chat = Chat(edgecm_cli.load_model(args), Console(file=out, width=120))
    chat.command(f"/video {tmp_path}")
    assert "no frames" in out.getvalue() and chat.video is None
    chat.command(f"/video {frames_dir}")
    assert "video attached" in out.getvalue()
    chat.answer("What happens?")
    assert chat.last.image_tokens == 24 and chat.video_turn == 0
    chat.command(f"/image {image_path}")
    chat.answer("And in the picture?")  # the video stays with the first user turn, the image goes with this one
    assert chat.last.image_tokens == 24 + 9 and chat.image_turn == 2  # turns: user, assistant, user
    assert "kept" in out.getvalue()


def test_image_and_video_in_one_prompt_match_transformers(setup, frames_dir, image_path):
    from edgecm.vision import load_image

    engine, builder, reference, _ = setup
    prompt = builder.build(QUESTION, load_image(image_path), read_video(frames_dir))
    ids = prompt.input_ids
    inputs = dict(
        reference_inputs(prompt), pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
        mm_token_type_ids=(ids == prompt.image_token_id).int() + 2 * (ids == prompt.video_token_id).int(),
    )
    with torch.inference_mode():
        err = (engine.forward(prompt) - reference(**inputs).logits).abs()
    print(f"image + video: max logit error {err.max().item():.3e}")
    assert prompt.image_positions.numel() == 9 + 24
    assert err.max().item() <= LOGITS_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"


def test_show_frames_the_kept_tokens_of_each_temporal_patch(build_qwen2_5_vl, frames_dir, tmp_path, capsys):
    from PIL import Image

    import edgecm_cli
    from edgecm_cli.show import KEPT_FRAME, PATCH_SCALE

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    out = tmp_path / "show.png"
    code = edgecm_cli.main(["show", "--model", str(model_dir), "--video", str(frames_dir), "-q", QUESTION,
                            "--out", str(out), "--tokens", "count:7", "--max-new-tokens", "4"])
    assert code == 0 and out.is_file()
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build(QUESTION, video=read_video(frames_dir))
    result = Engine(checkpoint, dtype="float32").generate(
        prompt, GenerationSettings(max_new_tokens=4), sparsity=SparsitySettings(tokens=TokenRule.parse("count:7"))
    )
    picture = Image.open(out).convert("RGB")
    cell, header, (frames, rows, cols) = 16 * PATCH_SCALE, 58, (2, 3, 4)  # two temporal patches of 3x4 tokens
    framed = {i for i in range(frames * rows * cols)
              if picture.getpixel(((i % cols) * cell + cell // 2, header + (i // cols) * cell)) == KEPT_FRAME}
    assert framed == set(result.selection.keep.tolist())
    assert "kept 7 of 24" in capsys.readouterr().out
    code = edgecm_cli.main(["show", "--model", str(model_dir), "-q", QUESTION, "--out", str(out)])
    assert code == 2 and "--image PATH or --video DIR" in capsys.readouterr().err


def test_caption_videos_and_images_together(build_qwen2_5_vl, frames_dir, image_path, tmp_path, capsys):
    import json

    import edgecm_cli

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    empty = tmp_path / "empty_clip"
    empty.mkdir()
    out = tmp_path / "captions.jsonl"
    code = edgecm_cli.main(["caption", str(frames_dir), str(empty), str(image_path), "--videos", "--out", str(out),
                            "--model", str(model_dir), "--max-new-tokens", "3"])
    assert code == 0, capsys.readouterr().err
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[frames_dir.name]["image_tokens"] == 24
    assert records[image_path.name]["image_tokens"] == 9
    assert "no frames" in records["empty_clip"]["error"]


def test_caption_takes_video_files_named_or_found_in_folders(build_qwen2_5_vl, frames_dir, image_path, tmp_path):
    import json

    import edgecm_cli

    model_dir, _ = build_qwen2_5_vl(**MODELS["published-untied"])
    clips = tmp_path / "clips"
    (clips / "day").mkdir(parents=True)
    write_test_video(clips / "a.mkv", frames_dir)
    write_test_video(clips / "day" / "b.mp4", frames_dir, codec="mpeg4")
    (clips / "broken.mov").write_bytes(b"\x00" * 100)
    named = write_test_video(tmp_path / "named.mkv", frames_dir)
    out = tmp_path / "captions.jsonl"
    common = ["--model", str(model_dir), "--max-new-tokens", "3", "--out", str(out)]
    # A video file named directly is a video without --videos; folders are searched for video files with it.
    assert edgecm_cli.main(["caption", str(named), str(image_path), *common]) == 0
    assert edgecm_cli.main(["caption", str(clips), *common, "--videos"]) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"a.mkv", "b.mp4", "broken.mov", image_path.name, "named.mkv"}
    assert records["named.mkv"]["image_tokens"] == records["a.mkv"]["image_tokens"] == 24
    assert records["b.mp4"]["image_tokens"] == 24 and records[image_path.name]["image_tokens"] == 9
    assert "cannot be decoded as a video" in records["broken.mov"]["error"]


def test_text_after_a_long_video_resumes_past_its_temporal_ids():
    """8 temporal patches 2 ids apart on a 2x2 token grid: the video's ids reach start + 14 on the temporal
    axis, so the text after it starts at start + 15 (Qwen's rule), not at start + 2 (transformers 5.x)."""
    from edgecm.families.qwen2_5_vl import rope_index

    ids = torch.tensor([7, 7] + [6] * 32 + [7, 7])  # text, video (token 6), text
    positions = rope_index(ids, {6: [([8, 4, 4], 2.0)]}, merge_size=2)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    video = positions[:, 2:34]
    assert video[0].tolist() == [2 + 2 * (i // 4) for i in range(32)]
    assert video[1].tolist() == [2 + (i % 4) // 2 for i in range(32)]
    assert positions[:, 34:].tolist() == [[17, 18]] * 3
