"""Shared fixtures: tiny checkpoints built once per session, and an isolated demo cache."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import (  # noqa: E402
    tiny_llama, tiny_llava, tiny_parrot, tiny_qwen2_5_vl, write_test_frames, write_test_image, write_wide_image,
)

CONTROL_ANSWER = "\x13"  # ^S: stops a terminal's output, so it must reach one escaped


def _built_once(tmp_path_factory, builder, name):
    """A factory returning (dir, reference model), building each distinct option set only once."""
    built = {}

    def build(**options):
        key = repr(sorted(options.items()))
        if key not in built:
            out = tmp_path_factory.mktemp(name)
            built[key] = (out, builder(out, **options))
        return built[key]

    return build


@pytest.fixture(scope="session")
def build_llava(tmp_path_factory):
    return _built_once(tmp_path_factory, tiny_llava, "llava")


@pytest.fixture(scope="session")
def build_llama(tmp_path_factory):
    return _built_once(tmp_path_factory, tiny_llama, "llama")


@pytest.fixture(scope="session")
def build_qwen2_5_vl(tmp_path_factory):
    return _built_once(tmp_path_factory, tiny_qwen2_5_vl, "qwen2_5_vl")


@pytest.fixture(scope="session")
def control_parrot(tmp_path_factory) -> Path:
    """A tiny Llama that answers every prompt with CONTROL_ANSWER, once per generated token."""
    out = tmp_path_factory.mktemp("parrot")
    tiny_parrot(out, CONTROL_ANSWER)
    return out


@pytest.fixture(scope="session")
def wide_image_path(tmp_path_factory) -> Path:
    return write_wide_image(tmp_path_factory.mktemp("img") / "wide.png")


@pytest.fixture(scope="session")
def frames_dir(tmp_path_factory) -> Path:
    return write_test_frames(tmp_path_factory.mktemp("video") / "frames")


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    return write_test_image(tmp_path_factory.mktemp("img") / "picture.png")


@pytest.fixture(scope="session", autouse=True)
def cpu_dtype_measured():
    """The CPU's dtype measured (or read) once before any test, so the CLI's one-time notice of that
    measurement lands in no test's stderr; tests/test_cpu_dtype.py asks for it on purpose."""
    from runtime.cpu_dtype import cpu_dtype

    cpu_dtype()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """An EDGECM_HOME of the test session's own, so the demo is built from the installed GGUF here."""
    from runtime.cpu_dtype import cpu_dtype

    home = tmp_path_factory.mktemp("edgecm_home")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGECM_HOME", str(home))
    cpu_dtype()  # measured into this home too, for the same reason
    yield home
    patch.undo()


def default_sigint() -> None:
    """preexec_fn for programs a test interrupts: Ctrl-C must reach them even when the test run itself was
    started with SIGINT ignored (a background job, nohup), which children would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture()
def small_disk(tmp_path):
    """A real filesystem of 64 KiB (a tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
