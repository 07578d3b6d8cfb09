"""Memory planning as pure functions: bytes per part of a model -> what is resident when.

Three phases, each with its own peak:
- vision: the CLIP tower (only the layers LLaVA reads) and projector, run once and freed;
- prefill: decoder layers stream through two buffers (one computing, one arriving),
  with the full prompt's activations and KV cache;
- decode: the decode set (attention weights + core-neuron FFN slices of every layer)
  stays resident if it fits; otherwise the compact slices stream through two buffers
  (from pinned host memory on CUDA; on a CPU host, from a compact file on disk, since
  host memory there is the budget itself and holds nothing beside it).
When the whole model fits beside the KV cache, every layer is kept after its first
use instead, so later prompts (chat turns, a caption batch) read nothing from disk.
The embedding, final norm and LM head stay resident throughout. A budget below the
smallest streaming peak is refused, with that smallest budget in the message.

Estimates, not measurements: activations are modelled from the shapes, and the
allocator's and CUDA context's overhead comes from the device profile.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from edgecm.config import ModelConfig
from edgecm.errors import EdgecmError
from edgecm.families import family_named

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "nf4": 0.5 + 4 / 64, "int8": 1 + 4 / 4096}
# nf4: 4 bits + a float32 scale per block of 64; int8: a byte + a float32 scale per row (4096 wide for 7B)
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
GiB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "cuda" or "cpu"
    memory_bytes: int
    memory_bandwidth_gbs: float
    reserved_bytes: int  # CUDA context, allocator slack: never available to tensors
    h2d_pinned_gbs: float | None = None
    h2d_pageable_gbs: float | None = None
    disk_read_gbs: float | None = None
    matmul_tflops: dict = field(default_factory=dict)
    supports_bf16: bool = False  # can compute in bfloat16; whether that is faster is matmul_tflops' to say
    supports_int8: bool = False
    default_dtype: str = "float16"
    source: str = ""

    @staticmethod
    def from_dict(data: dict) -> "DeviceProfile":
        known = {f for f in DeviceProfile.__dataclass_fields__}
        return DeviceProfile(**{k: v for k, v in data.items() if k in known})


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> DeviceProfile:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise EdgecmError(f"--profile {name_or_path}: no such profile; use a file or one of {', '.join(list_profiles())}")
    try:
        return DeviceProfile.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise EdgecmError(f"{path}: unreadable profile ({exc}); fix it or measure again with `edgecm profile`") from None


def parse_bytes(text: str) -> int:
    """'12GiB', '12 GB', '11.5G', '800MiB', '123456' -> bytes (G and GiB are binary, GB decimal); above zero."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise EdgecmError(f"--budget {text}: use a positive size in bytes, KiB, MiB, GiB or TiB, e.g. 12GiB, 11.5G, 800MiB")
    value, prefix, suffix = Fraction(match.group(1)), match.group(2).upper(), match.group(3)
    power = " KMGTP".index(prefix) if prefix else 0
    base = 1000 if suffix.upper() == "B" and prefix else 1024
    # Exact, and a part byte counts as a byte: "1.99GiB" is at least 1.99 GiB, so a figure printed by
    # format_size comes back as the same figure.
    size = math.ceil(value * base**power)
    if size <= 0:
        raise EdgecmError(f"--budget {text}: must be more than zero, e.g. 12GiB")
    return size


SIZE_UNITS = (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024))


def format_size(n: int, rounding: str = "nearest") -> str:
    """``n`` bytes with two decimals in the largest binary unit below it: '1.98 GiB', '614.40 MiB', '512 B'.

    ``rounding`` is "nearest", "up" or "down", done exactly (no float on the way). A smallest budget is
    printed rounded up and a refused one rounded down, so each figure stays on its side of the line.
    """
    if n < 1024:
        return f"{n:.0f} B"
    name, unit = next((name, unit) for name, unit in SIZE_UNITS if n >= unit)
    hundredths = Fraction(n) * 100 / unit
    value = {"nearest": round, "up": math.ceil, "down": math.floor}[rounding](hundredths)
    return f"{value // 100}.{value % 100:02d} {name}"


def format_min_budget(n: int) -> str:
    """The smallest workable budget, as every message prints it: rounded up, so ``--budget`` accepts the
    figure as printed (1.983 GiB shown as 1.98 GiB would be refused)."""
    return format_size(n, "up")


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of every part of a model at one weight dtype."""

    num_layers: int
    attention: int  # per layer: q, k, v, o (+ biases)
    ffn: int  # per layer: gate, up, down (+ biases)
    norms: int  # per layer
    embed: int
    head: int  # 0 when tied to the embedding
    final_norm: int
    vision: int  # the vision encoder as one request loads it (the family says what that is)
    kv_per_token: int  # keys + values, all layers, in the compute dtype
    hidden: int
    ffn_width: int
    vocab: int
    image_tokens: int
    vision_activations: int | None = None  # the family's own estimate for its tower, where it states one
    disk_layer: int = 0  # one layer as the checkpoint stores it (its dtype): what a read maps

    @property
    def layer(self) -> int:
        return self.attention + self.ffn + self.norms

    @property
    def resident_always(self) -> int:
        return self.embed + self.head + self.final_norm


def model_sizes(config: ModelConfig, weight_dtype: str, compute_dtype: str | None = None) -> ModelSizes:
    t = config.text
    wb = DTYPE_BYTES[weight_dtype]
    cb = DTYPE_BYTES[compute_dtype or ("float16" if weight_dtype == "nf4" else weight_dtype)]
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    attention = t.hidden_size * (q_out + 2 * kv_out) + q_out * t.hidden_size
    attention_bias = (q_out + 2 * kv_out) if t.attention_bias else 0
    ffn = 3 * t.hidden_size * t.intermediate_size
    ffn_bias = 2 * t.intermediate_size + t.hidden_size if t.mlp_bias else 0
    family = family_named(config.family)
    vision = int(family.vision_bytes(config, cb))
    image_tokens = family.image_tokens(config)
    vision_activations = family.vision_activation_bytes(config, cb)
    return ModelSizes(
        num_layers=t.num_layers,
        attention=int(attention * wb + attention_bias * cb),
        ffn=int(ffn * wb + ffn_bias * cb),
        norms=2 * t.hidden_size * cb,
        embed=t.vocab_size * t.hidden_size * cb,
        head=0 if t.tie_word_embeddings else int(t.vocab_size * t.hidden_size * wb),
        final_norm=t.hidden_size * cb,
        vision=vision,
        kv_per_token=2 * t.num_layers * kv_out * cb,
        hidden=t.hidden_size,
        ffn_width=t.intermediate_size,
        vocab=t.vocab_size,
        image_tokens=image_tokens,
        vision_activations=None if vision_activations is None else int(vision_activations),
        disk_layer=int((attention + ffn) * DTYPE_BYTES.get(t.dtype, 2) + 2 * t.hidden_size * cb),
    )


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 620  # LLaVA-1.5: 576 image tokens + a question
    new_tokens: int = 128
    kept_image_tokens: int = 64  # the paper's average after core-token selection
    neuron_fraction: float = 0.4  # the paper's beta; calibrate measures a model's own
    prune_layer: int = 2
    compute_bytes: int = 2
    # Sequences run together: KV cache and activations are per sequence (prompts padded to the longest).
    batch: int = 1


@dataclass(frozen=True)
class Plan:
    budget: int
    usable: int  # budget minus the profile's reserved bytes
    phases: dict  # phase -> {item: bytes}
    decode_resident: bool  # the decode set stays on the device (no weight traffic in decode)
    min_budget: int  # the smallest budget that runs, with everything streamed
    layers_resident: bool = False  # every layer kept on the device after its first use
    reserve: int = 0  # working set beside resident weights (slots, KV cache, activations) at its largest

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def name(self) -> str:
        if self.layers_resident:
            return "all layers kept"
        return "decode set resident" if self.decode_resident else "decode set streams"

    @property
    def peak_bytes(self) -> int:
        return max(self.peak(p) for p in self.phases)


def decode_layer_bytes(s: ModelSizes, neuron_fraction: float) -> int:
    """One layer as decode uses it: attention, norms and the kept share of the FFN (placement uses this too)."""
    return s.attention + s.norms + int(neuron_fraction * s.ffn)


def activation_bytes(tokens: int, s: ModelSizes, w: Workload) -> int:
    """Activations of ``tokens`` per sequence, for the workload's batch.

    hidden + residual + norm output (3 x d), q/k/v/out (4 x d), gate/up/h (3 x F) per token, plus each
    sequence's last-token logits in float32; SDPA's fused kernels keep attention scores out of memory.
    """
    return w.batch * (tokens * (7 * s.hidden + 3 * s.ffn_width) * w.compute_bytes + 4 * s.vocab)


def make_plan(
    s: ModelSizes, profile: DeviceProfile, budget: int, w: Workload = Workload(), resident: ModelSizes | None = None
) -> Plan:
    """What is resident in each phase under ``budget`` bytes; refuses a budget nothing fits in.

    ``resident`` gives the sizes of weights kept on the device when they differ
    from the streamed ones (NF4 or int8 quantisation of resident weights).
    """
    r = resident or s
    text_tokens = w.prompt_tokens - s.image_tokens
    kept = text_tokens + min(w.kept_image_tokens, s.image_tokens) if s.image_tokens else w.prompt_tokens
    early = min(w.prune_layer, s.num_layers)  # layers 0..K-1 hold every prompt token during prefill
    prefill_kv = w.batch * s.kv_per_token // s.num_layers * (early * w.prompt_tokens + (s.num_layers - early) * kept)
    decode_kv = w.batch * s.kv_per_token * (kept + w.new_tokens)
    compact_layer = decode_layer_bytes(s, w.neuron_fraction)
    decode_set = s.num_layers * decode_layer_bytes(r, w.neuron_fraction)
    always = {"embedding + final norm + LM head": s.resident_always}
    phases = {}
    if s.vision:
        tower_activations = s.vision_activations
        if tower_activations is None:  # a CLIP-sized tower: about half a decoder layer's per-token activations
            tower_activations = activation_bytes(s.image_tokens + 1, s, replace(w, batch=1)) // 2
        # Images go through the tower one at a time, whatever the batch.
        phases["vision"] = {**always, "vision tower + projector": s.vision, "vision activations": tower_activations}
    # On a CPU host the pages of the layer being read are the process's too while they are mapped: RSS
    # counts them, and the budget is host memory (the GPU's budget does not hold them).
    mapped = {"checkpoint pages of the layer being read": s.disk_layer} if profile.kind == "cpu" else {}
    phases["prefill"] = {**always, "2 streamed layer buffers": 2 * s.layer, **mapped, "KV cache (prompt)": prefill_kv,
                         "activations": activation_bytes(w.prompt_tokens, s, w)}
    streamed_decode = {**always, "2 streamed compact-layer buffers": 2 * compact_layer, **mapped,
                       "KV cache": decode_kv, "activations": activation_bytes(1, s, w)}
    min_budget = profile.reserved_bytes + max(
        sum(phases["prefill"].values()), sum(streamed_decode.values()), sum(phases.get("vision", {}).values())
    )
    usable = budget - profile.reserved_bytes
    if budget < min_budget:
        need, have = format_min_budget(min_budget), format_size(budget, "down")
        if w.batch > 1:
            raise EdgecmError(
                f"a batch of {w.batch} does not fit in {have} even with every layer streamed: it "
                f"needs at least {need} on {profile.name} (KV cache and activations grow with the batch); "
                f"lower --batch-size, use --batch-size auto, or raise --budget"
            )
        raise EdgecmError(
            f"budget {have} is too small for this model even with every layer streamed: "
            f"it needs at least {need} on {profile.name}; raise --budget"
        )
    # The decode set is gathered layer by layer during prefill, so it must fit beside prefill's working set too.
    reserve = max(sum(phases["prefill"].values()), sum(streamed_decode.values())) - s.resident_always
    resident_decode = {**always, "decode set (attention + core FFN slices)": decode_set, "KV cache": decode_kv,
                       "activations": activation_bytes(1, s, w)}
    fits = s.resident_always + decode_set + reserve <= usable
    if fits:
        phases["prefill"] = {**phases["prefill"], "decode set (gathered as prefill goes)": decode_set}
    phases["decode"] = resident_decode if fits else streamed_decode
    # Everything kept: all layers, plus the core slices decode uses in their place, beside the largest KV cache.
    slices = s.num_layers * int(w.neuron_fraction * r.ffn) if w.neuron_fraction < 1 else 0
    kept = {**always, "all layers (kept after first use)": s.num_layers * r.layer, "core FFN slices": slices, **mapped,
            "KV cache": w.batch * s.kv_per_token * (w.prompt_tokens + w.new_tokens),
            "activations": activation_bytes(w.prompt_tokens, s, w)}
    if sum(kept.values()) <= usable:
        phases["prefill"] = {k: v for k, v in kept.items() if k != "core FFN slices"}
        phases["decode"] = kept
        return Plan(budget=budget, usable=usable, phases=phases, decode_resident=True, min_budget=min_budget,
                    layers_resident=True, reserve=reserve)
    return Plan(budget=budget, usable=usable, phases=phases, decode_resident=fits, min_budget=min_budget,
                reserve=reserve)


def largest_batch(
    s: ModelSizes, profile: DeviceProfile, budget: int, w: Workload, resident: ModelSizes | None = None,
    limit: int = 256,
) -> int:
    """The largest batch (up to ``limit``) whose plan keeps the plan a batch of one gets, or 0 if none fits.

    A batch is worth its size only while it does not push the decode set off the device (or the
    layers out of memory): one weight fetch per step serving more sequences is the point of it.
    """
    try:
        single = make_plan(s, profile, budget, replace(w, batch=1), resident)
    except EdgecmError:
        return 0

    def fits(batch: int) -> bool:
        try:
            plan = make_plan(s, profile, budget, replace(w, batch=batch), resident)
        except EdgecmError:
            return False
        return plan.name == single.name and plan.peak_bytes <= plan.usable

    if not fits(1):
        return 1
    low = 1
    while low < limit and fits(min(2 * low, limit)):
        low = min(2 * low, limit)
    high = min(2 * low, limit + 1)  # the first size known not to fit (limit + 1: none above is tried)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# -- compute: what a prefill costs, for comparing token-pruning settings ---------------------------------


def layer_prefill_flops(config: ModelConfig, tokens: int) -> int:
    """Multiply-adds x 2 of one decoder layer over ``tokens`` prompt rows: the projections (2 x rows x
    parameters) and causal attention (q.k and the weighted sum of v over on average half the rows, for
    every head)."""
    t = config.text
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    matrices = t.hidden_size * (q_out + 2 * kv_out) + q_out * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return 2 * tokens * matrices + 2 * tokens * tokens * q_out


def vision_flops(config: ModelConfig, image_tokens: int) -> int:
    """The vision tower and projector over the patches behind ``image_tokens`` tokens (2 x patches x
    parameters; attention inside the tower is left out: it is the same for every token-pruning setting)."""
    if not image_tokens:
        return 0
    family = family_named(config.family)
    parameters = family.vision_bytes(config, 1)
    return 2 * image_tokens * family.patches_per_token(config) * parameters


def prefill_flops(config: ModelConfig, rows_per_layer: list[int], image_tokens: int) -> int:
    """A prefill whose layer l runs over ``rows_per_layer[l]`` rows, the vision tower included."""
    return vision_flops(config, image_tokens) + sum(layer_prefill_flops(config, rows) for rows in rows_per_layer)


def kv_bytes(config: ModelConfig, entries_per_layer: list[int], compute_bytes: int) -> int:
    """The KV cache decode starts from: keys and values of every layer's stored entries."""
    t = config.text
    return 2 * t.num_kv_heads * t.head_dim * compute_bytes * sum(entries_per_layer)
