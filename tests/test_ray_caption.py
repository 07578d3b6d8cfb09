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


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith(("edgecm: error", "edgecm caption: error"))]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("flags, message", [
    (["--ray", "--workers=-2"], "argument --workers: -2: use a whole number of at least 1"),
    (["--ray", "--workers", "0"], "argument --workers: 0: use a whole number of at least 1"),
    (["--workers", "2"], "--workers is for captioning on Ray; add --ray"),
    (["--ray-timeout", "5"], "--ray-timeout is for captioning on Ray; add --ray"),
    (["--ray=127.0.0.1:99999"], "--ray 127.0.0.1:99999: port 99999 is not a TCP port (1 to 65535)"),
    (["--ray=127.0.0.1"], "--ray '127.0.0.1': give auto, HOST:PORT"),
    (["--ray="], "--ray '': give auto, HOST:PORT"),
    (["--ray=http://127.0.0.1:8265"], "a web address (the dashboard's?), not the cluster's"),
    (["--ray=127.0.0.1:1"], "--ray 127.0.0.1:1: cannot connect (Connection refused); no Ray cluster listens there"),
    (["--ray=127.0.0.1:6379", "--ray-timeout", "0"], "--ray-timeout 0: must be more than 0 seconds"),
])
def test_ray_flags_are_checked_before_ray_starts(images, tmp_path, flags, message):
    out = tmp_path / "captions.jsonl"
    started = time.perf_counter()
    done = caption(tmp_path / "never-opened", [images], out, *flags, timeout=60)
    assert done.returncode == 2 and message in one_line(done.stderr)
    assert time.perf_counter() - started < 30 and not out.exists()


@pytest.fixture()
def not_ray():
    """A TCP port on 127.0.0.1 that accepts connections and never answers: something that is not Ray."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_an_address_where_no_ray_answers_ends_within_the_timeout(build_llava, images, tmp_path, not_ray):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "captions.jsonl"
    started = time.perf_counter()
    done = caption(model_dir, [images], out, "--ray", not_ray, "--ray-timeout", "3", timeout=60)
    assert done.returncode == 2
    assert f"--ray {not_ray}: no Ray cluster answered within 3 s" in one_line(done.stderr)
    assert done.stderr.strip().splitlines()[-1].startswith("edgecm: error")  # Ray's own warnings come before it
    assert time.perf_counter() - started < 30 and not out.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_joining_a_cluster_ends_at_once(build_llava, images, tmp_path, not_ray, sig, code):
    """Ray's connect blocks in C++ for tens of seconds between retries, where no Python handler runs."""
    model_dir, _ = build_llava(**TINY)
    out, log = tmp_path / "captions.jsonl", tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgecm_cli", "caption", str(images), "--out", str(out),
                                 "--model", str(model_dir), "--ray", not_ray, "--ray-timeout", "60"],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV, preexec_fn=default_sigint)
    deadline = time.time() + 60
    while "to caption" not in log.read_text():  # the last line before it joins the cluster
        assert time.time() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.1)
    time.sleep(3)  # inside Ray's connect by now
    proc.send_signal(sig)
    sent = time.perf_counter()
    assert proc.wait(timeout=30) == code, log.read_text()[-2000:]
    assert time.perf_counter() - sent < 5
    assert "Traceback" not in log.read_text() and not out.exists()
