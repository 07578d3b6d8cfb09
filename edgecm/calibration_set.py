"""What a calibration is measured on: images with questions, no labels (the model's own dense answers are
the reference).

Three sources:
- a JSONL file, one ``{"image": PATH, "question": TEXT}`` object a line (a relative image path is taken
  from the file's folder; a line without "image" is a text-only prompt);
- a folder of images, one question for all of them;
- for the demo, by default, a validation range of the shapes world: scenes from
  ``DEMO_CALIBRATION_FIRST_SEED`` on, apart from the held-out range bench/token_fidelity.py reports
  (seeds ``HELD_OUT_SEED_START`` + 0..299) and from the ranges used to choose the training length.

Every item is read and checked up front, so a bad line fails before any model work, naming the file and
line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgecm import scenes
from edgecm.errors import EdgecmError
from edgecm.vision import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEMO_CALIBRATION_FIRST_SEED = scenes.HELD_OUT_SEED_START + 3000
DEMO_CALIBRATION_SCENES = 60


@dataclass
class CalibrationItem:
    question: str
    image: object | None  # a PIL image, or None for a text-only prompt
    source: str  # where it came from, for messages: "file.jsonl:3", an image path, "scene 10003000"


@dataclass
class CalibrationSet:
    items: list[CalibrationItem]
    description: str  # e.g. "60 demo validation scenes from seed 10003000"

    def to_json(self) -> dict:
        return {"source": self.description, "prompts": len(self.items)}


def from_jsonl(path: Path, limit: int | None = None) -> CalibrationSet:
    if not path.is_file():
        raise EdgecmError(f"{path}: no such calibration file; pass a JSONL file of image/question lines or a folder")
    from edgecm.textfile import read_lines

    items = []
    fix = 'pass --set a JSONL file of {"image": PATH, "question": TEXT} lines, or a folder of images'
    for number, line in enumerate(read_lines(path, fix), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise EdgecmError(f"{where}: not JSON; write one object a line, like "
                              '{"image": "cat.png", "question": "What is in the picture?"}') from None
        if not isinstance(entry, dict):
            raise EdgecmError(f'{where}: not a JSON object; write {{"image": ..., "question": ...}}')
        question = entry.get("question")
        if not isinstance(question, str) or not question.strip():
            raise EdgecmError(f'{where}: no "question"; every line needs a question text')
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise EdgecmError(f'{where}: "image" must be a path (a string)')
        picture = None
        if image is not None:
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            try:
                picture = load_image(image_path)
            except EdgecmError as exc:
                raise EdgecmError(f"{where}: {exc}") from None
        items.append(CalibrationItem(question, picture, where))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise EdgecmError(f"{path}: the calibration set is empty; add image/question lines")
    return CalibrationSet(items, f"prompts from {path.name}")


def from_folder(folder: Path, question: str | None, limit: int | None = None) -> CalibrationSet:
    if not question or not question.strip():
        raise EdgecmError(f"{folder}: a folder of images needs --question, the question asked of every image")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise EdgecmError(f"{folder}: no images in it (PNG, JPEG, WebP, ...); the calibration set is empty")
    images = images[:limit] if limit is not None else images
    return CalibrationSet([CalibrationItem(question, load_image(p), str(p)) for p in images],
                          f"images from {folder.name}/")


def demo_validation(count: int = DEMO_CALIBRATION_SCENES) -> CalibrationSet:
    picked = scenes.questions_in_rotation(DEMO_CALIBRATION_FIRST_SEED, count, 1)
    return CalibrationSet([CalibrationItem(q.text, scene.render(), f"scene {scene.seed}") for scene, q in picked],
                          f"demo validation scenes from seed {DEMO_CALIBRATION_FIRST_SEED}")


def from_prompts(path: Path | None, image_path: str | None, limit: int | None = None) -> CalibrationSet:
    """Text prompts (a prompt file, or the shipped one), each asked with ``image_path`` if given."""
    from edgecm.fidelity import PROMPTS_FILE, load_prompts

    texts = load_prompts(path or PROMPTS_FILE)[:limit]
    image = load_image(image_path) if image_path else None
    name = (path or PROMPTS_FILE).name
    return CalibrationSet([CalibrationItem(t, image, name) for t in texts], f"prompts from {name}")


def load_calibration_set(source: str | None, question: str | None, limit: int | None, demo: bool,
                         prompts: str | None = None, image: str | None = None) -> CalibrationSet:
    """The set ``source`` names (a .jsonl file or a folder of images); else text prompts (``prompts``, or the
    shipped ones, with ``image`` if given); else, for the demo, its validation scenes."""
    if limit is not None and limit < 1:
        raise EdgecmError(f"--limit {limit}: must be at least 1")
    if source is not None:
        if prompts is not None or image is not None:
            raise EdgecmError("--set already holds the prompts (and images); drop --prompts and --image")
        path = Path(source)
        return from_folder(path, question, limit) if path.is_dir() else from_jsonl(path, limit)
    if question is not None:
        raise EdgecmError("--question is the question asked of every image of a --set folder; pass --set too")
    if prompts is None and image is None and demo:
        return demo_validation(limit or DEMO_CALIBRATION_SCENES)
    return from_prompts(Path(prompts) if prompts else None, image, limit)
