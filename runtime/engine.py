"""Prefill and decode loops over a streamed decoder, placed under a memory budget.

The engine keeps resident what every step needs: the token embedding, the
final norm, the LM head and the KV cache. Decoder layers come from the
streamer during prefill, the next one prefetched while the current one runs.
What decode needs afterwards (the decode set: attention weights and the
core-neuron FFN slices of every layer, or whole layers where a layer stays
dense) is placed on the device as long as the budget allows; slices that do
not fit wait in host memory and stream, and dense layers that do not fit are
read from disk again. When the planner finds room for the whole model, every
layer is kept after its first use instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from edgecm.checkpoint import Checkpoint
from edgecm.corematching import LayerActivationStats, TokenSelection, decode_neurons, fastv_scores, select_image_tokens
from edgecm.errors import EdgecmError
from edgecm.kv_cache import KVCache
from edgecm.model import LayerWeights, decoder_layer, rms_norm
from edgecm.prompt import Prompt
from edgecm.quant import check_supported, linear
from edgecm.rope import Rotary, apply_rotary
from edgecm.sampling import SamplingSettings, next_token
from edgecm.sparsity import DENSE, SparsitySettings
from edgecm.vision import VisionEncoder
from runtime.budget import Ledger, detect_profile, enforce, out_of_memory_message, resolve_budget
from runtime.planner import Plan, Workload, make_plan, model_sizes
from runtime.streamer import LayerStreamer
from runtime.telemetry import LayerTimer, PeakRSS, Spans, device_memory, latency_summary, nvml_snapshot

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgecmError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise EdgecmError(f"--device {name}: unknown device; use cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """float32 on CPU (exact, and fast there); on CUDA the checkpoint's half type, bf16 only where supported."""
    if name:
        if name not in _DTYPES:
            raise EdgecmError(f"--dtype {name}: unknown; use one of {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_at_eos: bool = True


@dataclass
class PrefillOutcome:
    """What one prefill decided: the logits of the next token and what decode runs on."""

    logits: torch.Tensor  # (V,) float32, for the token after the prompt
    decode_layers: dict[int, LayerWeights]  # the decode set placed on the device
    held_layers: dict[int, LayerWeights]  # core-neuron slices that did not fit: host memory, streamed per token
    kept_positions: torch.Tensor  # positions present after layer K (text + kept image tokens)
    image_tokens: int
    kept_image_tokens: int
    core_neurons: list[int]  # per layer: neurons decode uses (the full width for a dense layer)
    selection: TokenSelection | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos", "length" or "interrupted"
    timings: dict[str, float]
    memory: dict[str, int | None]
    kept_image_tokens: int = 0
    kv_cache_tokens: list[int] = field(default_factory=list)  # per layer, after generation
    core_neurons: list[int] = field(default_factory=list)
    selection: TokenSelection | None = None
    logits: torch.Tensor | None = None  # (n, V) per generated position, when collected
    ffn_width: int = 1
    telemetry: dict = field(default_factory=dict)  # NVML snapshot and streaming statistics

    @property
    def neuron_fraction(self) -> float:
        """The share of FFN neurons decode used, over all layers."""
        return sum(self.core_neurons) / (self.ffn_width * len(self.core_neurons)) if self.core_neurons else 1.0


TokenCallback = Callable[[int], None]


class Engine:
    """One loaded model under one budget: resident embedding/norm/head, streamed layers, owned loops.

    ``budget`` is a size such as "12GiB" (default: what the device has free);
    ``quant`` ("nf4" or "int8") quantises the weights kept on the device;
    ``resident`` keeps every layer after its first use whatever the plan says.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "cpu",
        dtype: str | None = None,
        resident: bool = False,
        budget: str | None = None,
        quant: str | None = None,
        prefetch: bool = True,
    ):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.text = checkpoint.config.text
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, self.text.dtype)
        if quant is not None:
            check_supported(quant, self.device)
        self.quant = quant
        self.profile = detect_profile(self.device)
        self.budget = resolve_budget(budget, self.device)
        if budget is not None:
            enforce(self.device, self.budget)
        self.force_resident = resident
        dtype_name = _DTYPE_NAMES[self.dtype]
        self.sizes = model_sizes(self.config, dtype_name, dtype_name)
        self.resident_sizes = model_sizes(self.config, quant or dtype_name, dtype_name)
        names = ["embed_tokens.weight", "norm.weight"]
        if not self.text.tie_word_embeddings:
            names.append("lm_head.weight")
        try:
            resident_tensors = {
                n: t.to(device=self.device, dtype=self.dtype) for n, t in checkpoint.read(names).items()
            }
        except torch.cuda.OutOfMemoryError:
            raise EdgecmError(out_of_memory_message(self.device, self.budget, "loading the embedding and head")) from None
        self.embed_tokens = resident_tensors["embed_tokens.weight"]  # (V, d)
        self.final_norm = resident_tensors["norm.weight"]
        self.lm_head = resident_tensors.get("lm_head.weight", self.embed_tokens)  # tied: the same tensor
        self.rotary = Rotary(self.text, self.device)
        self.streamer = LayerStreamer(checkpoint, self.device, self.dtype, prefetch=prefetch)
        self.timer = LayerTimer(self.device)
        self.last_plan: Plan | None = None

    # -- memory planning ---------------------------------------------------------------------------

    def plan_for(self, prompt_tokens: int, image_tokens: int, new_tokens: int, sparsity: SparsitySettings) -> Plan:
        """The planner's verdict for this request under this engine's budget (refuses one nothing fits in)."""
        neurons = sparsity.neurons
        fraction = neurons.share if sparsity.mode == "corematching" and neurons.kind == "beta" else 1.0
        workload = Workload(
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            kept_image_tokens=image_tokens,  # the kept count is known only at layer K; plan for all of them
            neuron_fraction=fraction,
            prune_layer=sparsity.prune_layer,
            compute_bytes=self.dtype.itemsize,
        )
        return make_plan(self.sizes, self.profile, self.budget, workload, resident=self.resident_sizes)

    def _keep(self, weights: LayerWeights) -> LayerWeights:
        """Weights that stay on the device: quantised if asked, always in memory of their own."""
        if self.quant is not None:
            weights = weights.quantized(self.quant)
        return weights.copied_to(self.device)

    # -- building blocks -------------------------------------------------------------------------

    def embed(self, prompt: Prompt, spans: Spans | None = None) -> torch.Tensor:
        """Token embeddings with projected image features placed at the image placeholder. -> (1, T, d)"""
        ids = prompt.input_ids.to(self.device)
        hidden = F.embedding(ids, self.embed_tokens)
        if prompt.pixel_values is None:
            return hidden
        if spans is None:
            spans = Spans(self.device)
        with spans.span("vision"):
            encoder = VisionEncoder(self.checkpoint, self.device, self.dtype)
            features = encoder.encode(prompt.pixel_values)  # (1, N, d)
            del encoder  # the tower is used once per image; its memory goes back now
        mask = ids == self.config.image_token_id
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise EdgecmError(
                f"the prompt holds {int(mask.sum())} image tokens but the image gives {features.shape[1]} features; "
                f"the processor and config.json disagree"
            )
        return hidden.masked_scatter(mask[..., None], features.to(hidden.dtype))

    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        resident_layers: dict[int, LayerWeights] | None = None,
        held_layers: dict[int, LayerWeights] | None = None,
        phase: str = "decode",
    ) -> torch.Tensor:
        """All decoder layers over ``hidden`` (1, T, d) at absolute ``positions`` (T,).

        A layer in ``resident_layers`` (the decode set on the device) is used as
        is, one in ``held_layers`` is copied from host memory, any other is streamed from disk.
        """
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        layers = self.streamer.stream(range(self.text.num_layers), resident_layers, held_layers)
        for index, weights in layers:
            with self.timer.layer(phase, index):
                hidden = decoder_layer(hidden, weights, self.text, cos, sin, positions, cache, index)
            del weights
        return hidden

    def _fastv(self, hidden: torch.Tensor, w: LayerWeights, cos, sin, image_rows: torch.Tensor) -> torch.Tensor:
        """FastV's score at this layer: attention from the last prompt token to each image token, mean over heads."""
        t = hidden.shape[1]
        h, hkv, d = self.text.num_heads, self.text.num_kv_heads, self.text.head_dim
        x = rms_norm(hidden, w.input_norm, self.text.rms_norm_eps)
        q = linear(x[:, -1:], w.q, w.q_bias).view(1, 1, h, d).transpose(1, 2)
        k = linear(x, w.k, w.k_bias).view(1, t, hkv, d).transpose(1, 2)
        q, k = apply_rotary(q, cos[-1:], sin[-1:]), apply_rotary(k, cos, sin)
        return fastv_scores(q[0, :, 0], k[0], h // hkv)[image_rows]

    def prefill(
        self, hidden: torch.Tensor, prompt: Prompt, sparsity: SparsitySettings, cache: KVCache
    ) -> PrefillOutcome:
        """Run the prompt through every layer, applying CoreMatching as ``sparsity`` says.

        Core neurons are counted from each layer's own FFN activations. At
        layer K the image tokens are scored and the hidden states, positions and
        (by default) the KV cache of layers 0..K are compacted to text + kept
        tokens; layers after K never see the dropped tokens. The last prompt
        position is text in every supported template and is always kept.
        """
        text = self.text
        positions = torch.arange(prompt.num_tokens, device=self.device)
        image_rows = prompt.image_positions.to(self.device)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        prune_at = sparsity.prune_layer if sparsity.prunes_tokens and image_rows.numel() else None
        if prune_at is not None and prune_at >= text.num_layers:
            raise EdgecmError(f"--prune-layer {prune_at}: the model has layers 0..{text.num_layers - 1}")
        collect = sparsity.mode == "corematching"
        place = self._placer()
        decode_layers: dict[int, LayerWeights] = {}
        held_layers: dict[int, LayerWeights] = {}
        core_counts: list[int] = []
        selection = None
        kept_image = int(image_rows.numel())
        for index, weights in self.streamer.stream(range(text.num_layers)):
            stats = None
            if collect:
                at_k = index == prune_at
                stats = LayerActivationStats(
                    sparsity.rho, image_rows if at_k else None, frequency=at_k or sparsity.neurons.kind == "beta"
                )
            fastv = None
            if index == prune_at and sparsity.token_rank == "fastv":
                fastv = self._fastv(hidden, weights, cos, sin, image_rows)
            with self.timer.layer("prefill", index):
                hidden = decoder_layer(hidden, weights, text, cos, sin, positions, cache, index, observer=stats)
            neurons = decode_neurons(stats, sparsity, index, text.intermediate_size) if collect else None
            place(index, weights, neurons, decode_layers, held_layers)
            core_counts.append(text.intermediate_size if neurons is None else int(neurons.numel()))
            del weights
            if index == prune_at:
                selection = select_image_tokens(sparsity, stats, fastv)
                keep = self._kept_rows(prompt.num_tokens, image_rows, selection.keep.to(self.device))
                kept_image = int(selection.keep.numel())
                hidden, positions = hidden[:, keep], positions[keep]
                cos, sin = cos[keep], sin[keep]
                if not sparsity.keep_early_kv:
                    for layer in range(index + 1):
                        cache.prune(layer, keep)
        return PrefillOutcome(
            logits=self.head(hidden[:, -1])[0],
            decode_layers=decode_layers,
            held_layers=held_layers,
            kept_positions=positions,
            image_tokens=int(image_rows.numel()),
            kept_image_tokens=kept_image,
            core_neurons=core_counts,
            selection=selection,
        )

    def _placer(self):
        """Decide, layer by layer as prefill finishes each, where its decode weights live.

        Greedy against the budget's ledger, keeping back room for the KV cache,
        the activations and two streaming slots: a layer's decode weights (its
        core slice, or the whole layer if it stays dense) go to the device while
        they fit. After that a slice waits in host memory (pinned on CUDA) and
        streams each token; a dense layer is read from disk again. Kept layers
        are already on the device and need nothing more.
        """
        r = self.resident_sizes
        reserve = self.last_plan.reserve  # the planner's working set, so placement and plan agree
        ledger = Ledger(usable=self.last_plan.usable)
        ledger.commit(self.sizes.resident_always + len(self.streamer.kept) * r.layer)
        keeping = self.streamer.keep_as is not None

        def place(index, weights, neurons, on_device: dict, on_host: dict) -> None:
            if neurons is None and index in self.streamer.kept:
                return
            decode = weights if neurons is None else weights.with_ffn_neurons(neurons.to(self.device))
            width = self.text.intermediate_size if neurons is None else int(neurons.numel())
            size = r.attention + r.norms + r.ffn * width // self.text.intermediate_size
            if keeping or ledger.fits(size, reserve):
                on_device[index] = self._keep(decode)
                ledger.commit(size)
            elif neurons is not None:
                on_host[index] = decode.copied_to(torch.device("cpu"), pin=self.device.type == "cuda")

        return place

    def _decode_weights(self, outcome: PrefillOutcome, on_device_only: bool = False) -> dict[int, LayerWeights]:
        """The weights decode uses for every layer not read from disk, by the streamer's precedence.

        The decode set wins over a kept layer (it may be a slice), which wins over
        a held slice. Held slices count as on the device only on CPU, where host
        memory is the compute memory.
        """
        held = {} if on_device_only and self.device.type == "cuda" else outcome.held_layers
        return {**held, **self.streamer.kept, **outcome.decode_layers}

    def _decode_bytes_per_token(self, outcome: PrefillOutcome) -> int:
        """Weight bytes one decode step reads: each layer as decode uses it, plus the final norm and LM head."""
        used = self._decode_weights(outcome)
        from_disk = (self.text.num_layers - len(used)) * self.sizes.layer  # streamed, in the compute dtype
        head = sum(t.numel() * t.element_size() for t in (self.final_norm, self.lm_head))
        return head + from_disk + sum(w.nbytes for w in used.values())

    def _kept_rows(self, length: int, image_rows: torch.Tensor, kept_image: torch.Tensor) -> torch.Tensor:
        """Sequence rows surviving layer K: every text row and the kept image rows, in order."""
        keep = torch.ones(length, dtype=torch.bool, device=self.device)
        keep[image_rows] = False
        keep[image_rows[kept_image]] = True
        return keep.nonzero().flatten()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (..., d) -> (..., V) logits in float32."""
        return linear(rms_norm(hidden, self.final_norm, self.text.rms_norm_eps), self.lm_head).float()

    # -- whole passes ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, prompt: Prompt) -> torch.Tensor:
        """Logits for every prompt position, (1, T, V): the dense reference pass."""
        hidden = self.embed(prompt)
        positions = torch.arange(prompt.num_tokens, device=self.device)
        cache = KVCache(self.text.num_layers)
        return self.head(self.run_layers(hidden, positions, cache, phase="prefill"))

    @torch.inference_mode()
    def generate(
        self,
        prompt: Prompt,
        settings: GenerationSettings,
        stop_token_ids: tuple[int, ...] = (),
        on_token: TokenCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        sparsity: SparsitySettings = DENSE,
        forced_tokens: list[int] | None = None,
        collect_logits: bool = False,
    ) -> GenerationResult:
        """Prefill the prompt, then decode up to ``settings.max_new_tokens`` tokens.

        ``forced_tokens`` teacher-forces the continuation (its tokens are fed
        instead of the model's choices; stopping rules still apply) and
        ``collect_logits`` keeps the logits of every generated position: together
        they measure a sparse setting against a dense reference answer.
        """
        if settings.max_new_tokens < 1:
            raise EdgecmError(f"--max-new-tokens {settings.max_new_tokens}: must be at least 1")
        total = prompt.num_tokens + settings.max_new_tokens
        # Dynamic NTK scaling exists to run past max_position_embeddings; every other rope type stops there.
        if total > self.text.max_position_embeddings and self.text.rope.rope_type != "dynamic":
            raise EdgecmError(
                f"prompt ({prompt.num_tokens} tokens) + --max-new-tokens {settings.max_new_tokens} exceeds the "
                f"model's context of {self.text.max_position_embeddings}; shorten the prompt or lower --max-new-tokens"
            )
        plan = self.plan_for(prompt.num_tokens, int(prompt.image_positions.numel()), settings.max_new_tokens, sparsity)
        self.last_plan = plan
        self.streamer.keep_as = self._keep if (self.force_resident or plan.layers_resident) else None
        try:
            return self._generate(
                prompt, settings, stop_token_ids, on_token, should_stop, sparsity, forced_tokens, collect_logits
            )
        except torch.cuda.OutOfMemoryError:
            raise EdgecmError(out_of_memory_message(self.device, self.budget, "generation")) from None

    def _generate(
        self, prompt, settings, stop_token_ids, on_token, should_stop, sparsity, forced_tokens, collect_logits
    ) -> GenerationResult:
        spans = Spans(self.device)
        generator = torch.Generator().manual_seed(settings.sampling.seed)
        cache = KVCache(self.text.num_layers, reserve_tokens=settings.max_new_tokens)
        self.streamer.reset_counters()
        self.timer = LayerTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tokens: list[int] = []
        step_logits: list[torch.Tensor] = []
        token_seconds: list[float] = []
        stop_reason = "length"
        with PeakRSS() as rss:
            started = time.perf_counter()
            hidden = self.embed(prompt, spans)
            with spans.span("prefill"):
                outcome = self.prefill(hidden, prompt, sparsity, cache)
                logits = outcome.logits
            prefill_stream = self.streamer.stats
            self.streamer.reset_counters()
            if len(self._decode_weights(outcome, on_device_only=True)) == self.text.num_layers:
                self.streamer.release_slots()  # decode moves no weights: the slots' memory goes to the KV cache
            first_token_s = time.perf_counter() - started
            # The next position is the unpruned prompt length, whatever the cache holds.
            position = prompt.num_tokens
            with spans.span("decode"):
                while True:
                    if collect_logits:
                        step_logits.append(logits.cpu())
                    if forced_tokens is not None and len(tokens) < len(forced_tokens):
                        token = forced_tokens[len(tokens)]
                    else:
                        token = next_token(logits, settings.sampling, generator)
                    tokens.append(token)
                    if on_token is not None:
                        on_token(token)
                    if settings.stop_at_eos and token in stop_token_ids:
                        stop_reason = "eos"
                        break
                    if len(tokens) >= settings.max_new_tokens:
                        break
                    if should_stop is not None and should_stop():
                        stop_reason = "interrupted"
                        break
                    step_started = time.perf_counter()
                    ids = torch.tensor([[token]], device=self.device)
                    step_positions = torch.tensor([position], device=self.device)
                    hidden = self.run_layers(
                        F.embedding(ids, self.embed_tokens), step_positions, cache,
                        outcome.decode_layers, outcome.held_layers,
                    )
                    logits = self.head(hidden[:, -1])[0]
                    logits[0].item()  # waits for the device, so the step's time is its real latency
                    token_seconds.append(time.perf_counter() - step_started)
                    position += 1
        decode_stream = self.streamer.stats
        per_token = self._decode_bytes_per_token(outcome)
        decode_steps = max(len(tokens) - 1, 0)  # the first token came from the prefill logits
        prefill_compute = self.timer.total("prefill")
        prefill_exposed = max(spans.seconds["prefill"] - prefill_compute, 0.0)
        timings = {
            "vision_s": spans.seconds.get("vision", 0.0),
            "prefill_s": spans.seconds["prefill"],
            "prefill_compute_s": prefill_compute,
            "prefill_transfer_s": prefill_stream.fetch_s,
            "prefill_transfer_exposed_s": min(prefill_exposed, prefill_stream.fetch_s),
            "prefill_transfer_hidden_s": max(prefill_stream.fetch_s - prefill_exposed, 0.0),
            "prefill_layer_compute_s": self.timer.per_layer("prefill"),
            "first_token_s": first_token_s,
            "decode_s": spans.seconds["decode"],
            "decode_transfer_s": decode_stream.fetch_s,
            "decode_compute_s": self.timer.total("decode"),
            "decode_tokens_per_s": decode_steps / spans.seconds["decode"] if decode_steps else 0.0,
            "decode_token_latency": latency_summary(token_seconds),
        }
        plan = self.last_plan
        memory = {
            "rss_start_bytes": rss.start_bytes,
            "rss_peak_bytes": rss.peak_bytes,
            "kv_cache_bytes": cache.nbytes(),
            "decode_set_bytes": sum(w.nbytes for w in outcome.decode_layers.values()),
            "decode_set_host_bytes": sum(w.nbytes for w in outcome.held_layers.values()),
            "kept_layer_bytes": sum(w.nbytes for w in self.streamer.kept.values()),
            "decode_layers_on_device": len(self._decode_weights(outcome, on_device_only=True)),
            "decode_weight_bytes_per_token": per_token,
            "weights_read_bytes": prefill_stream.bytes_read + decode_stream.bytes_read,
            "decode_weights_read_bytes": decode_stream.bytes_read,
            "decode_weights_copied_bytes": decode_stream.bytes_copied,
            "budget_bytes": self.budget,
            "plan_peak_bytes": plan.peak_bytes,
            "plan": "all layers kept" if plan.layers_resident else (
                "decode set resident" if plan.decode_resident else "decode set streams"
            ),
            **device_memory(self.device),
        }
        return GenerationResult(
            telemetry={"nvml": nvml_snapshot(self.device), "stream_prefill": prefill_stream.to_json(),
                       "stream_decode": decode_stream.to_json()},
            token_ids=tokens,
            prompt_tokens=prompt.num_tokens,
            image_tokens=outcome.image_tokens,
            stop_reason=stop_reason,
            timings=timings,
            memory=memory,
            kept_image_tokens=outcome.kept_image_tokens,
            kv_cache_tokens=[cache.length(i) for i in range(self.text.num_layers)],
            core_neurons=outcome.core_neurons,
            selection=outcome.selection,
            logits=torch.stack(step_logits) if collect_logits else None,
            ffn_width=self.text.intermediate_size,
        )
