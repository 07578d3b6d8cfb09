"""Shared fixtures: tiny checkpoints built once per session, and an isolated demo cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_llama, tiny_llava, write_test_image  # noqa: E402


@pytest.fixture(scope="session")
def build_llava(tmp_path_factory):
    """Factory: (dir, reference model) for a tiny LLaVA with the given options, built once per option set."""
    built = {}

    def build(**options):
        key = tuple(sorted(options.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("llava")
            built[key] = (out, tiny_llava(out, **options))
        return built[key]

    return build


@pytest.fixture(scope="session")
def build_llama(tmp_path_factory):
    built = {}

    def build(**options):
        key = repr(sorted(options.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("llama")
            built[key] = (out, tiny_llama(out, **options))
        return built[key]

    return build


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    return write_test_image(tmp_path_factory.mktemp("img") / "picture.png")


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """An EDGECM_HOME of the test session's own, so the demo is built from the installed GGUF here."""
    home = tmp_path_factory.mktemp("edgecm_home")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGECM_HOME", str(home))
    yield home
    patch.undo()
