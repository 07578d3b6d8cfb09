"""A small world of shapes whose right answers are known: the demo's training and test data.

A scene is a lightly textured plain background holding one to four
non-overlapping objects, each a circle, square or triangle in one of six
colours and three sizes. Objects are small (a medium object covers about
five of the 196 patches of a 224-pixel image cut into 16-pixel patches), so
most image tokens are background, as in real photos where a small share of
the tokens carries the answer. That is what makes token pruning measurable
here: an answer survives pruning only if the tokens that hold its object do.

Everything is drawn from one integer seed, so a seed names a scene, its
caption and its questions exactly. Training uses low seeds and evaluation
uses seeds from ``HELD_OUT_SEED_START`` on, which training never reaches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 214),
    "yellow": (240, 205, 30),
    "purple": (138, 60, 170),
    "orange": (245, 127, 14),
}
# Object extent in pixels at IMAGE_SIZE: about 1.6, 2.3 and 3 patches across.
SIZES = {"small": 26, "medium": 36, "large": 48}
IMAGE_SIZE = 224
MAX_OBJECTS = 4
# Light neutral backgrounds, far from every object colour.
BACKGROUNDS = ((236, 236, 232), (222, 226, 230), (240, 232, 216), (214, 214, 214), (228, 236, 226))
# Seeds from here on are never used for training.
HELD_OUT_SEED_START = 10_000_000
# An object whose centre lies within this share of the width (or height) of the middle
# is neither clearly left nor clearly right (top, bottom): no position question is asked.
POSITION_MARGIN = 0.12
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
READING_ROW = 16
# Orders a caption can name its objects in, as sort keys. Left to right is the
# world's own; reading order (by the row of 16-pixel patches an object's top
# edge lies in, then left to right) follows the order in which LLaVA's
# row-major image tokens first show each object. Scoring ignores the order
# (answer_is_correct).
_CAPTION_KEYS = {
    "left-to-right": lambda o: (o.cx, o.cy),
    "reading": lambda o: ((o.cy - o.extent / 2) // READING_ROW, o.cx),
}
CAPTION_ORDERS = tuple(_CAPTION_KEYS)

QUESTION_KINDS = ("colour", "shape", "count", "position", "presence", "caption")
# Ways to ask for a caption: the first is the one evaluated; the second is `edgecm caption`'s default prompt.
CAPTION_PROMPTS = (
    "What is in the picture?",
    "Write a short caption for this image.",
    "Describe the image.",
    "What do you see?",
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def extent(self) -> int:
        return SIZES[self.size]


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_KINDS
    text: str
    answer: str


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def render(self, size: int = IMAGE_SIZE):
        """The scene as an RGB PIL image of ``size`` x ``size`` pixels."""
        return render(self, size)

    @property
    def caption(self) -> str:
        return caption_of(self.objects)

    def questions(self) -> list[Question]:
        return questions_for(self)


def _plural(shape: str) -> str:
    return shape + "s"


def with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_of(objects: tuple[SceneObject, ...], order: str = "left-to-right") -> str:
    """'a red circle, a blue square and an orange triangle.', objects named in ``order`` (CAPTION_ORDERS)."""
    if order not in _CAPTION_KEYS:
        raise ValueError(f"caption order {order!r}: use one of {', '.join(CAPTION_ORDERS)}")
    names = [with_article(o.name) for o in sorted(objects, key=_CAPTION_KEYS[order])]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text + "."


def make_scene(seed: int) -> Scene:
    """The scene named by ``seed``: one to four objects placed without overlap."""
    rng = random.Random(seed)
    count = rng.randint(1, MAX_OBJECTS)
    objects: list[SceneObject] = []
    while len(objects) < count:
        size = rng.choice(tuple(SIZES))
        extent = SIZES[size]
        half = extent / 2 + 2
        cx, cy = rng.uniform(half, IMAGE_SIZE - half), rng.uniform(half, IMAGE_SIZE - half)
        # Keep a gap between objects so that every object is seen whole and apart.
        if any(np.hypot(cx - o.cx, cy - o.cy) < (extent + o.extent) / 2 * 1.25 + 4 for o in objects):
            continue
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, cx, cy))
    return Scene(seed, tuple(objects), rng.choice(BACKGROUNDS))


def render(scene: Scene, size: int = IMAGE_SIZE):
    """Draw at twice the size and downsample, so edges are anti-aliased like a photo's."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(scene.seed)
    big = 2 * IMAGE_SIZE
    # Background: the base colour, a gentle gradient and per-pixel noise, so that no two
    # background patches are identical.
    base = np.array(scene.background, dtype=np.float32)
    ys, xs = np.mgrid[0:big, 0:big].astype(np.float32) / big
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xs + np.sin(angle) * ys - 0.5) * rng.uniform(6, 18)
    noise = rng.normal(0, 5, size=(big, big, 3)).astype(np.float32)
    pixels = np.clip(base + gradient[..., None] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        jitter = rng.integers(-12, 13, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        draw_shape(draw, obj, 2.0, colour)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return img if size == IMAGE_SIZE else img.resize((size, size), Image.Resampling.LANCZOS)


def draw_shape(draw, obj: SceneObject, scale: float, fill) -> None:
    """Draw ``obj`` filled with ``fill`` on a PIL ImageDraw whose image is ``scale`` x IMAGE_SIZE."""
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.extent / 2 * scale
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(((cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)), fill=fill)


def questions_for(scene: Scene) -> list[Question]:
    """Every question of each kind that has one unambiguous answer in this scene."""
    rng = random.Random(scene.seed * 7 + 3)
    objs = scene.objects
    out: list[Question] = []
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}

    # Colour of a named shape, asked only where that shape occurs once.
    for shape, found in by_shape.items():
        if len(found) == 1:
            out.append(Question("colour", f"What colour is the {shape}?", found[0].colour))
    # Shape of a named colour, likewise.
    for colour, found in by_colour.items():
        if len(found) == 1:
            out.append(Question("shape", f"What shape is the {colour} object?", found[0].shape))
    out.append(Question("count", "How many objects are there?", NUMBER_WORDS[len(objs)]))
    shape = rng.choice(SHAPES)
    out.append(Question("count", f"How many {_plural(shape)} are there?", NUMBER_WORDS[len(by_shape[shape])]))
    # Position of a uniquely named object, where it is clearly on one side.
    names = [o.name for o in objs]
    middle = IMAGE_SIZE / 2
    margin = POSITION_MARGIN * IMAGE_SIZE
    for o in objs:
        if names.count(o.name) != 1:
            continue
        if abs(o.cx - middle) > margin:
            side = "left" if o.cx < middle else "right"
            out.append(Question("position", f"Is the {o.name} on the left or the right?", side))
        if abs(o.cy - middle) > margin:
            side = "top" if o.cy < middle else "bottom"
            out.append(Question("position", f"Is the {o.name} at the top or the bottom?", side))
    # Presence: one object that is there and one that is not.
    present = rng.choice(objs)
    out.append(Question("presence", f"Is there {with_article(present.name)}?", "yes"))
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in names]
    out.append(Question("presence", f"Is there {with_article(rng.choice(absent))}?", "no"))
    out.append(Question("caption", CAPTION_PROMPTS[0], scene.caption))
    return out


def questions_in_rotation(first_seed: int, n_scenes: int, per_scene: int = 1) -> list[tuple[Scene, Question]]:
    """``per_scene`` questions for each of ``n_scenes`` scenes from seed ``first_seed`` on, the kinds taken in
    rotation so that every kind is asked about equally often: each question is of the next kind in the
    rotation that the scene has."""
    picked = []
    turn = 0
    for i in range(n_scenes):
        scene = make_scene(first_seed + i)
        by_kind: dict[str, list[Question]] = {}
        for q in scene.questions():
            by_kind.setdefault(q.kind, []).append(q)
        for _ in range(per_scene):
            for step in range(len(QUESTION_KINDS)):
                kind = QUESTION_KINDS[(turn + step) % len(QUESTION_KINDS)]
                if kind in by_kind:
                    options = by_kind[kind]
                    picked.append((scene, options[(i + turn) % len(options)]))
                    turn = (turn + step + 1) % len(QUESTION_KINDS)
                    break
    return picked


def normalise_answer(text: str) -> str:
    """Lower-case, trimmed, without a final full stop: the form answers are compared in."""
    text = text.strip().lower()
    return text[:-1].strip() if text.endswith(".") else text


def answer_is_correct(question: Question, generated: str) -> bool:
    """Exact answer for the short kinds; for captions, the same multiset of named objects."""
    if question.kind != "caption":
        return normalise_answer(generated) == normalise_answer(question.answer)
    return _caption_objects(generated) == _caption_objects(question.answer)


def _caption_objects(text: str) -> list[str]:
    words = normalise_answer(text).replace(",", " ").split()
    found = [f"{a} {b}" for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]
    return sorted(found)
