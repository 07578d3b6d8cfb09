"""edgecm caption: inputs, shards, and an output file that survives interruption."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

import edgecm_cli
from edgecm.errors import EdgecmError
from edgecm_cli.caption import expand_inputs, in_shard, parse_shard
from edgecm_cli.captions_file import CaptionsFile
from conftest import default_sigint
from tiny import write_test_image

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)


def bomb_png(path, width=9000, height=9000):
    """A tiny PNG whose header claims 81 megapixels: a decompression bomb by its declared size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "deep" / "er").mkdir(parents=True)
    good = [write_test_image(root / "one.png", 40), write_test_image(root / "deep" / "two.jpg", 50),
            write_test_image(root / "deep" / "er" / "three.webp", 60)]
    (root / "notes.png").write_text("this is not a picture")
    truncated = root / "deep" / "cut.png"
    data = write_test_image(tmp_path / "whole.png", 64).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bomb_png(root / "deep" / "bomb.png")
    (root / "readme.md").write_text("not an image suffix: ignored in folders")
    return root, good


def test_expand_inputs_folders_lists_and_duplicates(corpus, tmp_path):
    root, good = corpus
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\ncorpus/one.png\n\n" + str(good[1]) + "\n")
    paths = expand_inputs([str(root), str(listing), str(good[0])]).paths
    assert len(paths) == 6  # 3 good + 3 bad image-suffixed files, each once; readme.md ignored
    assert all(p.is_absolute() for p in paths)
    with pytest.raises(EdgecmError, match="no such file or folder"):
        expand_inputs([str(tmp_path / "missing")])


def test_shards_partition_the_corpus(corpus):
    root, _ = corpus
    paths = expand_inputs([str(root)]).paths
    shards = [[p for p in paths if in_shard(p, (i, 3))] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(paths)
    assert sum(len(s) for s in shards) == len(paths)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(EdgecmError, match="--shard"):
            parse_shard(bad)


def test_recover_cuts_a_torn_line_and_keeps_the_rest(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps({"path": "/a", "caption": "x"}) + "\n" + json.dumps({"path": "/b", "error": "bad"}) + "\n" + '{"path": "/c", "capt')
    captions = CaptionsFile(out)
    assert captions.contents.done(retry_errors=False) == {"/a", "/b"}
    assert captions.contents.done(retry_errors=True) == {"/a"} and captions.contents.errors == 1
    captions.close()
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 2
    out.write_text("garbage line\n")
    with pytest.raises(EdgecmError, match="not a caption line"):
        CaptionsFile(out)


def read_lines(out):
    lines = out.read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_caption_end_to_end_with_bad_files_and_resume(build_llava, corpus, tmp_path, capsys):
    model_dir, _ = build_llava(**TINY)
    root, good = corpus
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(root), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "6"]
    assert edgecm_cli.main(args) == 0
    records = read_lines(out)
    assert len(records) == 6
    by_name = {os.path.basename(r["path"]): r for r in records}
    for name in ("one.png", "two.jpg", "three.webp"):
        r = by_name[name]
        assert "caption" in r and "error" not in r
        assert r["image_tokens"] == 16 and 0 < r["kept_image_tokens"] <= 16
        for key in ("prompt", "prefill_s", "decode_tokens_per_s", "model", "settings"):
            assert key in r
    assert "not an image" in by_name["notes.png"]["error"]
    assert "corrupt or truncated" in by_name["cut.png"]["error"]
    assert "too large" in by_name["bomb.png"]["error"]

    # An interrupted run: the last record torn in half, the one before lost entirely.
    full = out.read_text().splitlines(keepends=True)
    out.write_text("".join(full[:4]) + full[4][: len(full[4]) // 2])
    assert edgecm_cli.main(args) == 0
    again = read_lines(out)
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in records)  # no loss, no duplicates
    assert {r["path"]: r.get("caption") for r in again} == {r["path"]: r.get("caption") for r in records}

    # Everything done: a third run captions nothing and leaves the file alone.
    before = out.read_bytes()
    assert edgecm_cli.main(args) == 0
    assert out.read_bytes() == before
    assert "0 to caption" in capsys.readouterr().err


def test_shard_runs_cover_the_corpus_once(build_llava, corpus, tmp_path):
    model_dir, _ = build_llava(**TINY)
    root, _ = corpus
    outs = []
    for i in range(2):
        out = tmp_path / f"part{i}.jsonl"
        assert edgecm_cli.main(["caption", str(root), "--out", str(out), "--model", str(model_dir),
                                "--max-new-tokens", "2", "--shard", f"{i}/2"]) == 0
        # A shard the hash gives no image writes nothing, and leaves no empty file behind.
        outs.append({r["path"] for r in read_lines(out)} if out.exists() else set())
    assert not outs[0] & outs[1] and len(outs[0] | outs[1]) == 6


def test_batched_captions_equal_one_at_a_time_and_bad_files_do_not_stall(build_llava, corpus, tmp_path):
    model_dir, _ = build_llava(**TINY)
    root, good = corpus
    for i in range(4):  # more images of other sizes, so batches are full and mixed
        write_test_image(root / f"extra{i}.png", 36 + 7 * i)
    captions = {}
    for size in ("1", "3", "auto"):
        out = tmp_path / f"captions-{size}.jsonl"
        assert edgecm_cli.main(["caption", str(root), "--out", str(out), "--model", str(model_dir),
                                "--max-new-tokens", "8", "--batch-size", size]) == 0
        records = read_lines(out)
        assert len(records) == 10 and len({r["path"] for r in records}) == 10
        captions[size] = {r["path"]: r.get("caption", r.get("error")) for r in records}
        sizes = sorted({r["batch_size"] for r in records if "caption" in r})
        if size == "3":
            assert sizes == [1, 3]  # 7 readable images: two batches of 3 and one of 1
        elif size == "auto":
            assert sizes == [7]  # the tiny model's plan holds every image at once
    assert captions["3"] == captions["1"] and captions["auto"] == captions["1"]


def _spawn(model_dir, inputs, out, batch_size="auto"):
    return subprocess.Popen(
        [sys.executable, "-m", "edgecm_cli", "caption", *inputs, "--out", str(out), "--model", str(model_dir),
         "--max-new-tokens", "48", "--resident", "--batch-size", batch_size],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )


def _wait_for_lines(out, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("captioning made no progress")


# Batches of 4 keep the run long enough to be stopped mid-way; auto takes 16 at a time, and on the tiny
# model 40 images are done before the test could send a signal.
@pytest.mark.parametrize("sig,batch_size", [(signal.SIGKILL, "1"), (signal.SIGINT, "1"), (signal.SIGKILL, "4"),
                                            (signal.SIGINT, "4")])
def test_killed_run_resumes_without_loss_or_duplicates(build_llava, tmp_path, sig, batch_size):
    """Killed between batches or mid-batch: the batch in flight is redone on resume, nothing doubles."""
    model_dir, _ = build_llava(**TINY)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        write_test_image(folder / f"img{i:02d}.png", 32 + i)
    out = tmp_path / "captions.jsonl"
    proc = _spawn(model_dir, [str(folder)], out, batch_size)
    _wait_for_lines(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:  # Ctrl-C: a clean stop, one line saying so, no traceback
        assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, (proc.returncode, err[-2000:])
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = out.read_text()
    done_before = partial.count("\n")
    assert 3 <= done_before < 40
    proc = _spawn(model_dir, [str(folder)], out, batch_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    records = read_lines(out)
    paths = [r["path"] for r in records]
    assert len(paths) == 40 and len(set(paths)) == 40
    assert out.read_text().startswith(partial[: partial.rfind("\n") + 1])  # what was written stayed


def test_captioner_library_yields_errors_at_once_and_captions_in_batches(build_llava, corpus):
    """The library the CLI drives: an unreadable input is a record before the batch it would join runs."""
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import PromptBuilder
    from runtime.captioning import Captioner
    from edgecm.sparsity import DENSE
    from runtime.engine import Engine, GenerationSettings

    model_dir, _ = build_llava(**TINY)
    root, good = corpus
    checkpoint = open_checkpoint(model_dir)
    captioner = Captioner(Engine(checkpoint), PromptBuilder(checkpoint), "tiny",
                          generation=GenerationSettings(max_new_tokens=4), batch_size=2, sparsity=DENSE)
    inputs = [good[0], root / "notes.png", good[1], good[2]]
    records = list(captioner.caption(inputs))
    assert [r["path"] for r in records] == [str(p) for p in (root / "notes.png", good[0], good[1], good[2])]
    assert "error" in records[0] and [r["batch_size"] for r in records[1:]] == [2, 2, 1]
    with pytest.raises(EdgecmError, match="--batch-size 0"):
        Captioner(captioner.engine, captioner.builder, "tiny", batch_size=0)


def test_the_captioner_with_its_defaults_captions_as_the_cli_does(build_llava, corpus, tmp_path, capsys):
    """The README's promise: Captioner(engine, builder, name) gives `edgecm caption`'s records (same prompt,
    token count, CoreMatching settings and batching), the CLI only adding the output file."""
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import PromptBuilder
    from runtime.captioning import Captioner
    from runtime.engine import Engine

    model_dir, _ = build_llava(**TINY)
    _, good = corpus
    out = tmp_path / "captions.jsonl"
    assert edgecm_cli.main(["caption", *map(str, good), "--out", str(out), "--model", str(model_dir)]) == 0
    capsys.readouterr()
    checkpoint = open_checkpoint(model_dir)
    library = list(Captioner(Engine(checkpoint), PromptBuilder(checkpoint), str(model_dir)).caption(good))
    timed = ("batch_s", "prefill_s", "decode_tokens_per_s")
    cli = [{k: v for k, v in r.items() if k not in timed} for r in read_lines(out)]
    assert [{k: v for k, v in r.items() if k not in timed} for r in library] == cli
    assert cli[0]["settings"]["sparsity"]["mode"] == "corematching" and cli[0]["kept_image_tokens"] < 16


def test_caption_summaries_count_in_words(build_llava, corpus, tmp_path):
    model_dir, _ = build_llava(**TINY)
    root, good = corpus

    def caption(*inputs, out) -> str:
        done = subprocess.run([sys.executable, "-m", "edgecm_cli", "caption", *map(str, inputs), "--out", str(out),
                               "--model", str(model_dir), "--max-new-tokens", "2"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    one = caption(good[0], out=tmp_path / "one.jsonl")
    assert "edgecm: 1 image, 0 already in" in one and "wrote 1 line to" in one and "(0 errors)" in one, one
    two = caption(good[1], root / "notes.png", out=tmp_path / "two.jsonl")
    assert "edgecm: 2 images, 0 already in" in two and "wrote 2 lines to" in two and "(1 error)" in two, two
