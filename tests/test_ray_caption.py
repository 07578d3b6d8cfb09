"""edgecm caption --ray on a local Ray cluster the tests start and stop: results, a killed actor, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import default_sigint
from tiny import write_test_image

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU Ray head on this machine, as `ray start --head` makes one; stopped afterwards. It declares one
    GPU, which Ray only counts (nothing here asks for it except the placement test)."""
    port = free_port()
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--num-gpus", "1", "--port", str(port),
                    "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=ENV, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV, timeout=120)


def caption(model_dir, inputs, out, *extra, timeout=600):
    done = subprocess.run([sys.executable, "-m", "edgecm_cli", "caption", *map(str, inputs), "--out", str(out),
                           "--model", str(model_dir), "--max-new-tokens", "6", *extra],
                          capture_output=True, text=True, env=ENV, timeout=timeout)
    return done


def spawn(model_dir, inputs, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "edgecm_cli", "caption", *map(str, inputs), "--out", str(out),
                             "--model", str(model_dir), "--max-new-tokens", "40", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=default_sigint)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def wait_for_lines(out: Path, count: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    raise AssertionError("captioning on Ray made no progress")


def caption_actors() -> list[psutil.Process]:
    """The Ray worker processes that hold a CaptionWorker actor (Ray titles them after the actor)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if line.startswith("ray::") and "CaptionWorker" in line:
            found.append(proc)
    return found


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        write_test_image(folder / f"img{i:02d}.png", 32 + i)
    (folder / "broken.png").write_text("not a picture")
    return folder


def test_ray_captions_equal_the_plain_cli_once_each(build_llava, cluster, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    assert caption(model_dir, [images], plain).returncode == 0
    done = caption(model_dir, [images], on_ray, "--ray", cluster, "--workers", "2", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 CPU actors, 1 threads each" in done.stderr
    ours, theirs = records(on_ray), records(plain)
    assert len(ours) == 25 and len({r["path"] for r in ours}) == 25
    assert {r["path"]: r.get("caption") for r in ours} == {r["path"]: r.get("caption") for r in theirs}
    assert "not an image" in next(r for r in ours if r["path"].endswith("broken.png"))["error"]


def test_a_killed_actor_is_restarted_and_its_batch_redone(build_llava, cluster, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "captions.jsonl"
    proc = spawn(model_dir, [images], out, "--ray", cluster, "--workers", "2", "--batch-size", "2")
    wait_for_lines(out, 3, proc)
    victims = caption_actors()
    assert victims, "no CaptionWorker process found"
    victims[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    lines = records(out)
    assert len(lines) == 25 and len({r["path"] for r in lines}) == 25  # every image once, none doubled
    assert out.read_text().endswith("\n")  # no torn line


def test_a_killed_driver_resumes_from_out(build_llava, cluster, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "captions.jsonl"
    proc = spawn(model_dir, [images], out, "--ray", cluster, "--workers", "1", "--batch-size", "2")
    wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = out.read_text()
    kept = before[: before.rfind("\n") + 1]
    assert 3 <= kept.count("\n") < 25
    again = subprocess.run([sys.executable, "-m", "edgecm_cli", "caption", str(images), "--out", str(out), "--model",
                            str(model_dir), "--max-new-tokens", "40", "--ray", cluster, "--workers", "1"],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = records(out)
    assert len(lines) == 25 and len({r["path"] for r in lines}) == 25
    assert out.read_text().startswith(kept)  # what the first driver wrote stayed


def test_cuda_actors_take_one_gpu_each_and_no_more_than_the_cluster_has(cluster):
    from edgecm.errors import EdgecmError
    from runtime.ray_captioning import connect, placement_for

    ray = connect(cluster)
    try:
        assert placement_for(ray, "cuda", None).actors == 1
        assert placement_for(ray, "cuda", None).num_gpus == 1
        with pytest.raises(EdgecmError, match="--workers 2: the cluster has 1 GPU and"):
            placement_for(ray, "cuda", 2)  # the second actor would wait for a GPU forever
        assert placement_for(ray, "cpu", 2).num_gpus == 0
    finally:
        ray.shutdown()


def test_without_ray_installed_the_flag_names_the_install_command(build_llava, images, tmp_path):
    """Ray is hidden from the import system in a real subprocess, as on a machine without the extra."""
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "captions.jsonl"
    code = ("import sys; sys.modules['ray'] = None; import edgecm_cli; "
            f"sys.exit(edgecm_cli.main(['caption', {str(images)!r}, '--out', {str(out)!r}, '--model', "
            f"{str(model_dir)!r}, '--ray']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "pip install 'edgecm[ray]'" in done.stderr
    assert not out.exists()
