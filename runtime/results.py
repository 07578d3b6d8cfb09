"""Typed records of one generation: what happened, how long it took, what memory it used.

The engine fills these once; the CLI, the caption job and the benchmarks read
their fields (and ``to_json`` for machine-readable output) instead of
recomputing figures from string-keyed dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from edgecm.corematching import TokenSelection
from runtime.streamer import StreamStats


@dataclass(frozen=True)
class Timings:
    vision_s: float  # the vision encoder, loaded, run and freed
    prefill_s: float  # the decoder over the prompt, weight streaming included
    prefill_compute_s: float
    prefill_transfer_s: float  # weight fetches during prefill, hidden or not
    prefill_transfer_exposed_s: float  # the part compute waited for
    prefill_transfer_hidden_s: float
    prefill_layer_compute_s: list[float]
    first_token_s: float
    decode_s: float
    decode_transfer_s: float
    decode_compute_s: float
    decode_tokens_per_s: float
    decode_token_latency: dict[str, float]  # p50_ms, p90_ms, max_ms

    @property
    def time_to_answer_s(self) -> float:
        """Vision and prefill together: what a user waits before the first token."""
        return self.vision_s + self.prefill_s


@dataclass(frozen=True)
class MemoryReport:
    rss_start_bytes: int
    rss_peak_bytes: int
    kv_cache_bytes: int
    decode_set_bytes: int  # decode weights placed on the device during prefill
    decode_set_host_bytes: int  # core slices that did not fit, streamed per token: pinned host memory on CUDA, a file on CPU
    kept_layer_bytes: int  # whole layers kept after their first use
    decode_layers_on_device: int
    decode_weight_bytes_per_token: int
    weights_read_bytes: int
    decode_weights_read_bytes: int
    decode_weights_copied_bytes: int
    budget_bytes: int
    plan_peak_bytes: int
    plan: str  # "all layers kept", "decode set resident" or "decode set streams"
    device_peak_allocated_bytes: int | None
    device_peak_reserved_bytes: int | None

    @property
    def peak(self) -> tuple[str, int]:
        """The peak that matters on this device: ("device peak", bytes) on CUDA, else ("peak RSS", bytes)."""
        if self.device_peak_allocated_bytes is not None:
            return "device peak", self.device_peak_allocated_bytes
        return "peak RSS", self.rss_peak_bytes


@dataclass(frozen=True)
class Telemetry:
    nvml: dict  # runtime.telemetry.nvml_snapshot: name, memory, utilisation, power, or why unavailable
    stream_prefill: StreamStats
    stream_decode: StreamStats

    def to_json(self) -> dict:
        return {"nvml": self.nvml, "stream_prefill": self.stream_prefill.to_json(),
                "stream_decode": self.stream_decode.to_json()}


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos", "length" or "interrupted"
    timings: Timings
    memory: MemoryReport
    telemetry: Telemetry
    kept_image_tokens: int = 0
    kv_cache_tokens: list[int] = field(default_factory=list)  # per layer, after generation
    core_neurons: list[int] = field(default_factory=list)
    selection: TokenSelection | None = None
    logits: torch.Tensor | None = None  # (n, V) per generated position, when collected
    ffn_width: int = 1
    # Per layer: the neurons decode used (ascending), None where the layer stayed dense.
    decode_neurons: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def neuron_fraction(self) -> float:
        """The share of FFN neurons decode used, over all layers."""
        return sum(self.core_neurons) / (self.ffn_width * len(self.core_neurons)) if self.core_neurons else 1.0

    def to_json(self) -> dict:
        """Everything but the selection and the logits, as plain JSON values."""
        return {
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "image_tokens": self.image_tokens,
            "stop_reason": self.stop_reason,
            "timings": asdict(self.timings),
            "memory": asdict(self.memory),
            "telemetry": self.telemetry.to_json(),
            "kept_image_tokens": self.kept_image_tokens,
            "kv_cache_tokens": self.kv_cache_tokens,
            "kv_cache_bytes": self.memory.kv_cache_bytes,
            "core_neurons": self.core_neurons,
            "ffn_width": self.ffn_width,
        }
