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
from edgecm.corematching import LayerActivationStats, TokenSelection, decode_neurons
from edgecm.errors import EdgecmError
from edgecm.kv_cache import KVCache
from edgecm.model import LayerWeights, decoder_layer, rms_norm
from edgecm.prompt import Prompt
from edgecm.quant import check_supported, linear
from edgecm.rope import Rotary
from edgecm.sampling import SamplingSettings, next_token, seeded_generator
from edgecm.sparsity import SparsitySettings
from edgecm.token_pruning import TEXT, Rows, TokenPruner
from runtime.budget import detect_profile, enforce, out_of_memory_message, resolve_budget
from runtime.cpu_dtype import cpu_dtype
from runtime.placement import DecodePlacement
from runtime.planner import Plan, Workload, largest_batch, make_plan, model_sizes
from runtime.results import GenerationResult, MemoryReport, Telemetry, Timings
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
    """``name`` if given; on CPU the measured choice (bfloat16 where this CPU multiplies it faster, else
    float32: runtime.cpu_dtype); on CUDA the checkpoint's half type, bf16 only where supported."""
    if name:
        if name not in _DTYPES:
            raise EdgecmError(f"--dtype {name}: unknown; use one of {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        return _DTYPES[cpu_dtype().chosen]
    if checkpoint_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


DEFAULT_DEVICE = "cpu"  # the one every machine has; --device cuda asks for the GPU


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_at_eos: bool = True


@dataclass
class PrefillOutcome:
    """What one prefill decided: the logits of the next token and what decode runs on."""

    logits: torch.Tensor  # (V,) float32, for the token after the prompt
    placement: DecodePlacement  # where each layer's decode weights live
    kept_positions: torch.Tensor  # rotary ids present after layer K (text + kept image tokens): (T',) or (3, T')
    kept_order: torch.Tensor  # their sequence indices (T',)
    image_tokens: int
    kept_image_tokens: int
    core_neurons: list[int]  # per layer: neurons decode uses (the full width for a dense layer)
    selection: TokenSelection | None = None
    decode_neurons: list[torch.Tensor | None] = field(default_factory=list)  # per layer; None: dense


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
        device: str = DEFAULT_DEVICE,
        dtype: str | None = None,
        resident: bool = False,
        budget: str | None = None,
        quant: str | None = None,
        prefetch: bool = True,
    ):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.config = checkpoint.config
        self.text = checkpoint.config.text
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, self.text.dtype)
        if quant is not None:
            check_supported(quant, self.device)
        self.quant = quant
        self.profile = detect_profile(self.device)
        self.budget = resolve_budget(budget, self.device)
        # Always, not only for an explicit budget: the allocator's cap is per process, and one set by an earlier
        # engine would otherwise still bind this one below the budget it plans for.
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

    def plan_for(
        self, prompt_tokens: int, image_tokens: int, new_tokens: int, sparsity: SparsitySettings, batch: int = 1
    ) -> Plan:
        """The planner's verdict for this request (``batch`` sequences of up to ``prompt_tokens``) under this
        engine's budget; refuses one nothing fits in."""
        workload = self.workload_for(prompt_tokens, image_tokens, new_tokens, sparsity, batch)
        return make_plan(self.sizes, self.profile, self.budget, workload, resident=self.resident_sizes)

    def workload_for(
        self, prompt_tokens: int, image_tokens: int, new_tokens: int, sparsity: SparsitySettings, batch: int = 1
    ) -> Workload:
        neurons = sparsity.neurons
        fraction = neurons.share if sparsity.mode == "corematching" and neurons.kind == "beta" else 1.0
        return Workload(
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            kept_image_tokens=image_tokens,  # the kept count is known only at layer K; plan for all of them
            neuron_fraction=fraction,
            prune_layer=self._full_layers(sparsity),
            compute_bytes=self.dtype.itemsize,
            batch=batch,
        )

    def _full_layers(self, sparsity: SparsitySettings) -> int:
        """Layers that see every prompt token: K, or up to SparseVLM's last stage (the planner's safe side)."""
        return sparsity.ranking_layers(self.text.num_layers)[-1] + 1

    def largest_batch(
        self, prompt_tokens: int, image_tokens: int, new_tokens: int, sparsity: SparsitySettings, limit: int = 256
    ) -> int:
        """The most sequences like this that run together under this engine's budget with the plan one
        sequence gets (0: not even one fits)."""
        one = self.workload_for(prompt_tokens, image_tokens, new_tokens, sparsity)
        return largest_batch(self.sizes, self.profile, self.budget, one, self.resident_sizes, limit)

    def _keep(self, weights: LayerWeights) -> LayerWeights:
        """Weights that stay on the device: quantised if asked, always in memory of their own."""
        if self.quant is not None:
            weights = weights.quantized(self.quant)
        return weights.copied_to(self.device)

    # -- building blocks -------------------------------------------------------------------------

    def embed(self, prompt: Prompt, spans: Spans | None = None) -> torch.Tensor:
        """Token embeddings with the family's vision features placed at the image (and video) placeholders.
        -> (1, T, d)"""
        ids = prompt.input_ids.to(self.device)
        hidden = F.embedding(ids, self.embed_tokens)
        vision = prompt.vision_inputs()
        if not vision:
            return hidden
        if spans is None:
            spans = Spans(self.device)
        with spans.span("vision"):
            encoder = self.family.vision_encoder(self.checkpoint, self.device, self.dtype)
            # (placeholder mask, features (N, d) in prompt order) per input: images, then a video
            placed = [(ids == token, encoder.encode(pixels, grids)) for token, pixels, grids in vision]
            del encoder  # the encoder is used once per request; its memory goes back now
        for mask, features in placed:
            if int(mask.sum()) != features.shape[0]:
                raise EdgecmError(
                    f"the prompt holds {int(mask.sum())} vision tokens but the vision tower gives {features.shape[0]} "
                    f"features; the processor and config.json disagree"
                )
            hidden = hidden.masked_scatter(mask[..., None], features.to(hidden.dtype))
        return hidden

    def embed_batch(self, prompts: list[Prompt], spans: Spans | None = None) -> list[torch.Tensor]:
        """Each prompt's embeddings (T_b, d), like ``embed``; the vision tower is loaded once for the batch
        and runs over all its images (and, apart, all its videos) together."""
        ids = [p.input_ids.to(self.device) for p in prompts]
        hidden = [F.embedding(i, self.embed_tokens)[0] for i in ids]
        groups: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        for b, prompt in enumerate(prompts):
            for token, pixels, grids in prompt.vision_inputs():
                groups.setdefault(token, []).append((b, pixels, grids))
        if not groups:
            return hidden
        if spans is None:
            spans = Spans(self.device)
        with spans.span("vision"):
            encoder = self.family.vision_encoder(self.checkpoint, self.device, self.dtype)
            features = {}
            for token, items in groups.items():
                pixels = torch.cat([p for _, p, _ in items])
                grids = None if items[0][2] is None else torch.cat([g for _, _, g in items])
                features[token] = encoder.encode(pixels, grids)  # (all of this kind's tokens, d), prompt order
            del encoder
        for token, items in groups.items():
            counts = [int((ids[b] == token).sum()) for b, _, _ in items]
            if sum(counts) != features[token].shape[0]:
                raise EdgecmError(
                    f"the prompts hold {sum(counts)} vision tokens but the vision tower gives "
                    f"{features[token].shape[0]} features; the processor and config.json disagree"
                )
            for (b, _, _), part in zip(items, features[token].split(counts)):
                mask = ids[b][0] == token
                hidden[b] = hidden[b].masked_scatter(mask[:, None], part.to(hidden[b].dtype))
        return hidden

    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor | None,
        order: torch.Tensor,
        cache: KVCache,
        placement: DecodePlacement | None = None,
        phase: str = "decode",
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """All decoder layers over ``hidden`` (1, T, d) at rotary ``positions`` ((T,) or (3, T)) and
        sequence indices ``order`` (T,).

        With a ``placement``, its decode set on the device is used as is, its
        held slices are copied from host memory, and any other layer streams from disk.
        A batch passes its rotary tables ready made (``cos_sin``) instead of positions.
        """
        cos, sin = cos_sin if cos_sin is not None else self.rotary.cos_sin(positions, self.dtype)
        on_device = placement.on_device if placement else None
        on_host = placement.on_host if placement else None
        for index, weights in self.streamer.stream(range(self.text.num_layers), on_device, on_host):
            with self.timer.layer(phase, index):
                hidden = decoder_layer(hidden, weights, self.text, cos, sin, order, cache, index)
            del weights
        return hidden

    def prefill(
        self, hidden: torch.Tensor, prompt: Prompt, sparsity: SparsitySettings, cache: KVCache,
        fixed_neurons: list[torch.Tensor | None] | None = None,
    ) -> PrefillOutcome:
        """Run the prompt through every layer, applying CoreMatching (or a baseline) as ``sparsity`` says.

        ``fixed_neurons`` (per layer, None for dense) replaces the neurons this
        prompt would choose: a batch's shared decode set, given to one sequence.

        Core neurons are counted from each layer's own FFN activations. The
        image tokens are ranked at layer K-1 (SparseVLM: at each of its stage
        layers); the hidden states, positions and (by default) the KV cache of
        the layers run so far are compacted to text + kept tokens, and the
        layers after never see the dropped ones. The last prompt position is
        text in every supported template and is always kept.
        """
        text = self.text
        rows, pruner = self.start_sequence(hidden[0], prompt, sparsity)
        collect = sparsity.mode == "corematching"
        placement = self.new_placement()
        for index, weights in self.streamer.stream(range(text.num_layers)):
            core_rows = pruner.core_rows(index, rows)
            stats = None
            if collect:
                stats = LayerActivationStats(
                    sparsity.rho, core_rows, frequency=core_rows is not None or sparsity.neurons.kind == "beta",
                    reference_row=pruner.reference_row(index, rows),
                )
            probe = pruner.attention_probe(index, rows)
            observe_attention = None if probe is None else (lambda q, keys: probe(q[0], keys[0]))
            with self.timer.layer("prefill", index):
                out = decoder_layer(rows.hidden[None], weights, text, rows.cos, rows.sin, rows.order, cache, index,
                                    observer=stats, attention_observer=observe_attention)
            rows.hidden = out[0]
            if fixed_neurons is not None:
                neurons = fixed_neurons[index]
            else:
                neurons = decode_neurons(stats, sparsity, index, text.intermediate_size) if collect else None
            placement.place(index, weights, neurons)
            del weights
            pruned = pruner.after_layer(index, rows, stats)
            if pruned is not None:
                rows, survivors = pruned
                if not sparsity.keep_early_kv:
                    for layer in range(index + 1):
                        cache.keep_orders(layer, [survivors])
        return PrefillOutcome(
            logits=self.head(rows.hidden[-1:])[0],
            placement=placement,
            kept_positions=rows.positions,
            kept_order=rows.order,
            image_tokens=pruner.image_tokens,
            kept_image_tokens=pruner.kept_tokens,
            core_neurons=placement.neuron_counts(),
            selection=pruner.selection,
            decode_neurons=placement.neurons,
        )

    def new_placement(self) -> DecodePlacement:
        """An empty placement of one request's decode weights against the last plan."""
        return DecodePlacement(self.last_plan, self.sizes, self.resident_sizes, self.streamer, self.device, self._keep)

    def start_sequence(self, hidden: torch.Tensor, prompt: Prompt, sparsity: SparsitySettings) -> tuple[Rows, TokenPruner]:
        """A prompt's rows entering layer 0 (embeddings ``hidden`` (T, d), the family's rotary ids and
        tables, sequence indices, and which rows hold which image or video token) and its token pruner."""
        positions = self.family.positions(self.config, prompt, self.device)  # rotary ids, (T,) or (3, T)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        source = torch.full((prompt.num_tokens,), TEXT, dtype=torch.long, device=self.device)
        image_rows = prompt.image_positions.to(self.device)
        source[image_rows] = torch.arange(image_rows.numel(), device=self.device)
        order = torch.arange(prompt.num_tokens, device=self.device)  # sequence indices: what the mask follows
        rows = Rows(hidden, positions, order, cos, sin, source)
        text = self.text
        return rows, TokenPruner.start(sparsity, text.num_layers, text.num_heads // text.num_kv_heads, rows,
                                       prompt.reference_index)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (..., d) -> (..., V) logits in float32."""
        return linear(rms_norm(hidden, self.final_norm, self.text.rms_norm_eps), self.lm_head).float()

    # -- whole passes ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, prompt: Prompt) -> torch.Tensor:
        """Logits for every prompt position, (1, T, V): the dense reference pass."""
        hidden = self.embed(prompt)
        positions = self.family.positions(self.config, prompt, self.device)
        order = torch.arange(prompt.num_tokens, device=self.device)
        cache = KVCache(self.text.num_layers)
        return self.head(self.run_layers(hidden, positions, order, cache, phase="prefill"))

    @torch.inference_mode()
    def generate(
        self,
        prompt: Prompt,
        settings: GenerationSettings,
        stop_token_ids: tuple[int, ...] = (),
        on_token: TokenCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        sparsity: SparsitySettings = SparsitySettings(),
        forced_tokens: list[int] | None = None,
        collect_logits: bool = False,
        fixed_neurons: list[torch.Tensor | None] | None = None,
    ) -> GenerationResult:
        """Prefill the prompt, then decode up to ``settings.max_new_tokens`` tokens.

        ``sparsity`` defaults to CoreMatching with ``SparsitySettings()``'s defaults, as ``edgecm run``
        runs it (less a checkpoint's calibration file, which the CLI reads); ``edgecm.sparsity.DENSE``
        runs the dense model.

        ``forced_tokens`` teacher-forces the continuation (its tokens are fed
        instead of the model's choices; stopping rules still apply) and
        ``collect_logits`` keeps the logits of every generated position: together
        they measure a sparse setting against a dense reference answer.
        ``fixed_neurons`` decodes with given neurons per layer (see ``prefill``).
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
                prompt, settings, stop_token_ids, on_token, should_stop, sparsity, forced_tokens, collect_logits,
                fixed_neurons,
            )
        except torch.cuda.OutOfMemoryError:
            raise EdgecmError(out_of_memory_message(self.device, self.budget, "generation")) from None

    def _generate(
        self, prompt, settings, stop_token_ids, on_token, should_stop, sparsity, forced_tokens, collect_logits,
        fixed_neurons=None,
    ) -> GenerationResult:
        spans = Spans(self.device)
        generator = seeded_generator(settings.sampling.seed, self.device)  # where head() puts the logits
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
                outcome = self.prefill(hidden, prompt, sparsity, cache, fixed_neurons)
                logits = outcome.logits
            placement = outcome.placement
            prefill_stream = self.streamer.stats
            self.streamer.reset_counters()
            if placement.moves_no_weights():
                self.streamer.release_slots()  # decode moves no weights: the slots' memory goes to the KV cache
            first_token_s = time.perf_counter() - started
            # The next rotary position follows the unpruned prompt (the family says where: for M-RoPE the
            # largest prompt id + 1), and so does the next sequence index, whatever the cache holds.
            position = self.family.next_position(self.config, prompt)
            index = prompt.num_tokens
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
                    logits = self.decode_step(token, position, index, cache, placement)
                    token_seconds.append(time.perf_counter() - step_started)
                    position += 1
                    index += 1
        decode_stream = self.streamer.stats
        decode_steps = max(len(tokens) - 1, 0)  # the first token came from the prefill logits
        return GenerationResult(
            token_ids=tokens,
            prompt_tokens=prompt.num_tokens,
            image_tokens=outcome.image_tokens,
            stop_reason=stop_reason,
            timings=self._timings(spans, prefill_stream, decode_stream, first_token_s, token_seconds, decode_steps),
            memory=self._memory_report(rss, cache, placement, prefill_stream, decode_stream),
            telemetry=Telemetry(nvml_snapshot(self.device), prefill_stream, decode_stream),
            kept_image_tokens=outcome.kept_image_tokens,
            kv_cache_tokens=[cache.length(i) for i in range(self.text.num_layers)],
            core_neurons=outcome.core_neurons,
            selection=outcome.selection,
            logits=torch.stack(step_logits) if collect_logits else None,
            ffn_width=self.text.intermediate_size,
            decode_neurons=outcome.decode_neurons,
        )

    def decode_step(
        self, token: int, position: int, index: int, cache: KVCache, placement: DecodePlacement
    ) -> torch.Tensor:
        """One new token through every layer at rotary ``position`` and sequence ``index`` -> next logits (V,)."""
        ids = torch.tensor([[token]], device=self.device)
        positions = torch.tensor([position], device=self.device)  # one id serves every M-RoPE axis of text
        order = torch.tensor([index], device=self.device)
        hidden = self.run_layers(F.embedding(ids, self.embed_tokens), positions, order, cache, placement)
        logits = self.head(hidden[:, -1])[0]
        logits[0].item()  # waits for the device, so the step's time is its real latency
        return logits

    # -- the records of one generation -----------------------------------------------------------

    def _timings(self, spans, prefill_stream, decode_stream, first_token_s, token_seconds, decode_steps) -> Timings:
        prefill_compute = self.timer.total("prefill")
        prefill_exposed = max(spans.seconds["prefill"] - prefill_compute, 0.0)
        return Timings(
            vision_s=spans.seconds.get("vision", 0.0),
            prefill_s=spans.seconds["prefill"],
            prefill_compute_s=prefill_compute,
            prefill_transfer_s=prefill_stream.fetch_s,
            prefill_transfer_exposed_s=min(prefill_exposed, prefill_stream.fetch_s),
            prefill_transfer_hidden_s=max(prefill_stream.fetch_s - prefill_exposed, 0.0),
            prefill_layer_compute_s=self.timer.per_layer("prefill"),
            first_token_s=first_token_s,
            decode_s=spans.seconds["decode"],
            decode_transfer_s=decode_stream.fetch_s,
            decode_compute_s=self.timer.total("decode"),
            decode_tokens_per_s=decode_steps / spans.seconds["decode"] if decode_steps else 0.0,
            decode_token_latency=latency_summary(token_seconds),
        )

    def _memory_report(self, rss, cache, placement: DecodePlacement, prefill_stream, decode_stream) -> MemoryReport:
        plan = self.last_plan
        head_bytes = sum(t.numel() * t.element_size() for t in (self.final_norm, self.lm_head))
        return MemoryReport(
            rss_start_bytes=rss.start_bytes,
            rss_peak_bytes=rss.peak_bytes,
            kv_cache_bytes=cache.nbytes(),
            decode_set_bytes=sum(w.nbytes for w in placement.on_device.values()),
            decode_set_host_bytes=sum(w.nbytes for w in placement.on_host.values()),
            kept_layer_bytes=sum(w.nbytes for w in self.streamer.kept.values()),
            decode_layers_on_device=len(placement.decode_weights(on_device_only=True)),
            decode_weight_bytes_per_token=placement.bytes_per_token(head_bytes),
            weights_read_bytes=prefill_stream.bytes_read + decode_stream.bytes_read,
            decode_weights_read_bytes=decode_stream.bytes_read,
            decode_weights_copied_bytes=decode_stream.bytes_copied,
            budget_bytes=self.budget,
            plan_peak_bytes=plan.peak_bytes,
            plan=plan.name,
            **device_memory(self.device),
        )
