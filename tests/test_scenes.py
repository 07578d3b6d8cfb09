"""The shapes world: deterministic per seed, ground truth consistent with what is drawn."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from edgecm import scenes


def test_a_seed_names_one_scene_exactly():
    a, b = scenes.make_scene(42), scenes.make_scene(42)
    assert a == b and a.questions() == b.questions()
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    other = scenes.make_scene(43)
    assert other != a
    assert not np.array_equal(np.asarray(other.render()), np.asarray(a.render()))


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_ground_truth_matches_the_scene(seed):
    scene = scenes.make_scene(seed)
    objs = scene.objects
    assert 1 <= len(objs) <= scenes.MAX_OBJECTS
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:  # apart: no object hides another
            assert np.hypot(a.cx - b.cx, a.cy - b.cy) > (a.extent + b.extent) / 2
    by_kind = {}
    for q in scene.questions():
        by_kind.setdefault(q.kind, []).append(q)
    assert by_kind["count"][0].answer == scenes.NUMBER_WORDS[len(objs)]
    for q in by_kind.get("colour", []):
        shape = q.text.split()[-1].rstrip("?")
        assert [o.colour for o in objs if o.shape == shape] == [q.answer]
    for q in by_kind["presence"]:
        name = q.text.removeprefix("Is there ").removesuffix("?").split(" ", 1)[1]
        assert (q.answer == "yes") == any(o.name == name for o in objs)
    for q in by_kind.get("position", []):
        obj = next(o for o in objs if o.name in q.text)
        coord = obj.cx if "left" in q.text else obj.cy
        assert (coord < scenes.IMAGE_SIZE / 2) == (q.answer in ("left", "top"))
    assert scenes.answer_is_correct(by_kind["caption"][0], scene.caption)


def test_objects_cover_a_small_share_of_the_image():
    """Most patches are background, as in photos: the answer lives in a few tokens."""
    covered = []
    for seed in range(50):
        scene = scenes.make_scene(seed)
        covered.append(sum(o.extent ** 2 for o in scene.objects) / scenes.IMAGE_SIZE ** 2)
    assert max(covered) < 0.25 and np.mean(covered) < 0.1


def test_background_patches_are_not_identical():
    pixels = np.asarray(scenes.make_scene(3).render(), dtype=np.int16)
    corner_a, corner_b = pixels[:16, :16], pixels[-16:, -16:]
    assert not np.array_equal(corner_a, corner_b) and corner_a.std() > 1


def test_answers_are_compared_as_a_person_would():
    q = scenes.Question("colour", "What colour is the circle?", "red")
    assert scenes.answer_is_correct(q, " Red.") and not scenes.answer_is_correct(q, "dark red")
    caption = scenes.Question("caption", scenes.CAPTION_PROMPTS[0], "a red circle and a blue square.")
    assert scenes.answer_is_correct(caption, "A blue square and a red circle.")
    assert not scenes.answer_is_correct(caption, "a red circle.")
    assert not scenes.answer_is_correct(caption, "a red circle, a blue square and a blue square.")


def _training_conversations():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "train_demo_vision.py"
    spec = importlib.util.spec_from_file_location("train_demo_vision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.conversation


def test_training_conversations_open_with_the_caption_when_asked_to():
    conversation = _training_conversations()
    scene = scenes.make_scene(7)
    others = sorted(q.text for q in scene.questions() if q.kind != "caption")
    for seed in range(20):
        chat = conversation(scene, random.Random(seed), caption_first=1.0)
        assert chat[0].kind == "caption" and chat[0].text in scenes.CAPTION_PROMPTS
        assert chat[0].answer == scene.caption
        assert sorted(q.text for q in chat[1:]) == others  # every other question follows, once
    # Without the option the caption is in about half the conversations, at any turn.
    plain = [conversation(scene, random.Random(seed)) for seed in range(200)]
    with_caption = [c for c in plain if any(q.kind == "caption" for q in c)]
    assert 70 < len(with_caption) < 130
    assert sum(c[0].kind == "caption" for c in with_caption) < len(with_caption) / 2


def test_reading_order_names_objects_row_band_by_row_band_then_left_to_right():
    def obj(colour, cx, cy):
        return scenes.SceneObject("circle", colour, "small", cx, cy)

    # Red is rightmost but its top edge lies in the first 16-pixel row band; blue and green share a band.
    objects = (obj("green", 150, 120), obj("red", 200, 20), obj("blue", 30, 118))
    assert scenes.caption_of(objects) == "a blue circle, a green circle and a red circle."
    assert scenes.caption_of(objects, "reading") == "a red circle, a blue circle and a green circle."
    with pytest.raises(ValueError, match="caption order 'diagonal'"):
        scenes.caption_of(objects, "diagonal")


def test_the_training_caption_order_changes_the_answer_and_no_draw():
    conversation = _training_conversations()
    scene = next(s for s in map(scenes.make_scene, range(100))
                 if scenes.caption_of(s.objects, "reading") != s.caption)
    for seed in range(10):
        plain = conversation(scene, random.Random(seed), caption_first=0.5)
        reading = conversation(scene, random.Random(seed), caption_first=0.5, caption_order="reading")
        assert [q.text for q in plain] == [q.text for q in reading]
        assert [q.answer if q.kind != "caption" else scene.caption for q in reading] == [q.answer for q in plain]
        for q in reading:
            if q.kind == "caption":
                assert q.answer == scenes.caption_of(scene.objects, "reading") != scene.caption
