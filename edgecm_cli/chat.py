"""``edgecm chat``: a multi-turn terminal chat with a live memory and speed panel.

Each answer streams into a rich Live view: the text so far above a panel with
memory used / total, KV cache, kept image tokens, FFN neuron share, prefill
time and tok/s. Ctrl-C stops the current answer (a SIGINT handler sets a
flag the decode loop checks every token) without leaving; Ctrl-D or /quit
leaves. Each turn runs prefill over the whole conversation so far.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
import signal
import sys
import time

from edgecm.errors import EdgecmError
from edgecm_cli.terminal import escape_controls

HELP = """commands:
  /image PATH   attach or replace the image (it goes with your next message)
  /video PATH   attach or replace a video: a file or a folder of frames (Qwen2.5-VL; with your next message)
  /stats        the full breakdown of the last answer
  /reset        forget the conversation and detach the image and the video
  /help         this list
  /quit         leave (Ctrl-D works too); Ctrl-C stops an answer without leaving"""


class Chat:
    def __init__(self, loaded, console, image=None, image_path: str | None = None, video_options=None):
        self.loaded = loaded
        self.console = console
        self.turns: list[tuple[str, str]] = []
        self.image = image
        self.image_path = image_path
        self.image_turn: int | None = None  # the user turn the image belongs to
        self.video = None  # an edgecm.video.Video
        self.video_path: str | None = None
        self.video_turn: int | None = None
        self.video_options = video_options  # fps and max frames of /video
        self.last = None  # GenerationResult of the last answer
        self._stop = False

    # -- panel ---------------------------------------------------------------------------------

    def panel(self, streaming: dict | None = None):
        from rich.panel import Panel
        from rich.table import Table

        from edgecm_cli import format_bytes
        from runtime.telemetry import memory_readout

        mem = memory_readout(self.loaded.engine.device)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan")
        grid.add_column()
        grid.add_row("memory", f"{format_bytes(mem['used'])} / {format_bytes(mem['total'])}  [dim]{mem['source']}[/]")
        if streaming is not None:
            grid.add_row("decoding", f"{streaming['tokens']} tokens, {streaming['rate']:.1f} tok/s")
        last = self.last
        if last is not None:
            t = last.timings
            grid.add_row("KV cache", f"{format_bytes(last.memory.kv_cache_bytes)} ({max(last.kv_cache_tokens)} tokens)")
            grid.add_row("image tokens", f"kept {last.kept_image_tokens} of {last.image_tokens}")
            grid.add_row("FFN neurons", f"{last.neuron_fraction:.0%} in decode")
            grid.add_row("last turn", f"prefill {t.time_to_answer_s:.2f} s, decode {t.decode_tokens_per_s:.1f} tok/s")
            m = last.memory
            grid.add_row("plan", f"{m.plan} under {format_bytes(m.budget_bytes)}, "
                         f"decode set {format_bytes(m.decode_set_bytes + m.kept_layer_bytes)} on the device")
        title = f"edgecm · {self.loaded.model_name} · image: {self.image_path or 'none'}"
        if self.video_path:
            title += f" · video: {self.video_path}"
        return Panel(grid, title=title, border_style="blue", expand=False)

    # -- commands ------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.console.print(HELP)
        elif name == "/reset":
            # Everything goes: an attachment that keeps failing (a video too long for the context) must not
            # outlive the conversation it was sent with.
            self.turns, self.image_turn, self.video_turn, self.last = [], None, None, None
            self.image = self.image_path = self.video = self.video_path = None
            self.console.print("[dim]conversation cleared, image and video detached[/]")
        elif name == "/stats":
            self.print_stats()
        elif name == "/image":
            self.attach(arg.strip())
        elif name == "/video":
            self.attach_video(arg.strip())
        else:
            self.console.print(f"[red]unknown command {name}[/]; /help lists them")
        return True

    def attach(self, path: str) -> None:
        from edgecm.vision import load_image

        if not path:
            self.console.print("[red]/image needs a path[/], e.g. /image photo.jpg")
            return
        if not self.loaded.checkpoint.config.is_multimodal:
            self.console.print("[red]this is a text-only model; it cannot take an image[/]")
            return
        try:
            self.image = load_image(path)
        except EdgecmError as exc:
            self.console.print(f"[red]{exc}[/]")
            return
        self.image_path, self.image_turn = path, None  # goes with the next message
        self.console.print(f"[dim]image attached: {path}; your next message re-runs prefill with it[/]")
        self.warn_if_pruned()

    def warn_if_pruned(self) -> None:
        """The demo's pruning notice, for an image attached inside the chat (the CLI gives it at start-up)."""
        from edgecm_cli import demo_pruning_notice

        notice = demo_pruning_notice(self.loaded.model_name, self.loaded.sparsity, self.loaded.calibration,
                                     self.loaded.checkpoint.config.text.num_layers)
        if notice:
            self.console.print(f"[yellow]{notice}[/]")

    def attach_video(self, path: str) -> None:
        from edgecm.video import VideoOptions, read_video

        if not path:
            self.console.print("[red]/video needs a video file or a folder of frames[/], e.g. /video clip.mp4")
            return
        if not self.loaded.checkpoint.family.takes_video:
            self.console.print("[red]this model takes no video[/]; /image attaches an image")
            return
        try:
            self.video = read_video(path, self.video_options or VideoOptions())
        except EdgecmError as exc:
            self.console.print(f"[red]{exc}[/]")
            return
        self.video_path, self.video_turn = path, None  # goes with the next message
        self.console.print(f"[dim]video attached: {path} ({len(self.video.frames)} frames); "
                           f"your next message re-runs prefill with it[/]")

    def print_stats(self) -> None:
        from rich.table import Table

        from edgecm_cli import format_bytes

        if self.last is None:
            self.console.print("[dim]no answer yet[/]")
            return
        r = self.last
        table = Table(title="last answer", show_header=False)
        for key, value in asdict(r.timings).items():
            if isinstance(value, dict):  # per-token latency summary
                table.add_row(key, ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
            elif isinstance(value, list):  # per-layer seconds
                table.add_row(key, " ".join(f"{v * 1000:.0f}" for v in value) + " ms")
            else:
                table.add_row(key, f"{value:.3f}" if key.endswith("_s") else f"{value:.1f}")
        for key, value in asdict(r.memory).items():
            if key.endswith("_bytes"):
                table.add_row(key, format_bytes(value))
            else:
                table.add_row(key, str(value))
        nvml = r.telemetry.nvml
        if nvml.get("available"):
            table.add_row("GPU", f"{nvml['name']}, {nvml.get('gpu_utilization_percent')} % busy, "
                          f"{nvml.get('power_watts')} W")
        else:
            table.add_row("GPU", str(nvml.get("reason", "n/a")))
        table.add_row("prompt tokens", str(r.prompt_tokens))
        table.add_row("image tokens kept", f"{r.kept_image_tokens} / {r.image_tokens}")
        table.add_row("KV tokens per layer", f"min {min(r.kv_cache_tokens)}, max {max(r.kv_cache_tokens)}")
        table.add_row("core neurons per layer", " ".join(str(n) for n in r.core_neurons))
        table.add_row("settings", str(self.loaded.sparsity.to_json()))
        self.console.print(table)

    # -- answering -----------------------------------------------------------------------------

    def answer(self, text: str) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.text import Text

        from edgecm.prompt import TextStream

        loaded = self.loaded
        turns = self.turns + [("user", text)]
        image_turn, video_turn = self.image_turn, self.video_turn
        if self.image is not None and image_turn is None:
            image_turn = len(turns) - 1
        if self.video is not None and video_turn is None:
            video_turn = len(turns) - 1
        prompt = loaded.builder.build_conversation(turns, self.image, image_turn, self.video, video_turn)
        stream = TextStream(loaded.builder)
        shown = Text()
        counter = {"tokens": 0, "first": None}
        self._stop = False

        def on_sigint(signum, frame):
            self._stop = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            with Live(Group(shown, self.panel()), console=self.console, refresh_per_second=8) as live:

                def on_token(token: int) -> None:
                    now = time.perf_counter()
                    counter["first"] = counter["first"] or now
                    counter["tokens"] += 1
                    shown.append(escape_controls(stream.push(token)))  # the chat screen is a terminal's
                    elapsed = now - counter["first"]
                    rate = (counter["tokens"] - 1) / elapsed if elapsed > 0 else 0.0
                    live.update(Group(shown, self.panel({"tokens": counter["tokens"], "rate": rate})))

                result = loaded.engine.generate(
                    prompt,
                    loaded.generation,
                    loaded.builder.stop_token_ids,
                    on_token=on_token,
                    should_stop=lambda: self._stop,
                    sparsity=loaded.sparsity,
                )
                self.last = result
                live.update(Group(shown, self.panel()))
        finally:
            signal.signal(signal.SIGINT, previous)
            if not self.console.is_terminal:  # rich ends a live view with a newline on terminals only
                self.console.line()
        if result.stop_reason == "interrupted":
            self.console.print("[yellow](answer stopped)[/]")
        self.turns = turns + [("assistant", loaded.builder.decode(result.token_ids))]
        self.image_turn, self.video_turn = image_turn, video_turn

    def loop(self) -> int:
        self.console.print(f"edgecm chat · {self.loaded.model_name} · /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = self.console.input("[bold green]you>[/] ")
                if not sys.stdin.isatty():  # nothing echoed what was read: show it, ending the prompt's line
                    self.console.print(escape_controls(line), markup=False)
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /quit to leave)[/]")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.answer(line)
            except EdgecmError as exc:  # e.g. the conversation outgrew the context
                self.console.print(f"[red]{exc}[/]; /reset starts over")


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgecm.video import VideoOptions, read_video
    from edgecm.vision import load_image
    from edgecm_cli import check_generation_flags, load_model, sparsity_from_flags

    check_generation_flags(args)
    sparsity_from_flags(args)  # bad flags fail before the model loads
    image = load_image(args.image) if args.image else None
    options = VideoOptions(args.fps, args.max_frames)
    video = read_video(args.video, options) if args.video else None  # a bad folder fails before the model loads
    loaded = load_model(args)  # refuses an --image or --video the model cannot take before loading it
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 then arrives with its bytes escaped, and is refused as text is, instead of
        # raising inside input() in a locale whose decoding is strict.
        sys.stdin.reconfigure(errors="surrogateescape")
    chat = Chat(loaded, Console(highlight=False), image, args.image, options)
    chat.video, chat.video_path = video, args.video
    return chat.loop()
