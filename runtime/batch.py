"""Batched generation: several prompts through one pass of the weights per step.

Why: in both of edgecm's regimes a decode step is bound by reading weights
(from device memory, or streamed from host memory or disk), so one read that
serves B sequences gives up to B times the tokens. Prefill streams each layer
once for the whole batch as well.

How the batch is laid out: **padded, not packed**. Each sequence is one row
of a (B, T, d) tensor, padded on the right to the longest; a row's padding
and the empty slots of its KV cache carry the sequence index PAD_ORDER, which
sorts after every real token, so the ordinary causal rule (a query sees the
entries whose index is not above its own) keeps real tokens off padding with
no separate mask. Padding rather than packing because:
- CoreMatching prunes each sequence at layer K to its own core tokens; rows
  re-pad to the new longest and the cache compacts row by row (``prune_rows``),
  which is a gather per row, where a packed layout would rebuild its offsets;
- decode appends one column for every row, so the KV cache stays one tensor
  per layer that SDPA reads directly;
- the waste is bounded: prompts differ by their question, and a captioning
  batch holds images of one size.

What is per sequence and what is shared:
- per sequence: its image or video tokens, the core tokens it keeps at layer
  K, its rotary positions (1-D or M-RoPE), sampling settings and seed, its
  stopping (a sequence that stops leaves the batch: its cache row is dropped);
- shared: the decode set. Core neurons are counted over all sequences' tokens
  (f(n) and the activation mass summed over the batch), so every layer is read
  once per step for everyone.

The single-sequence ``Engine.generate`` is the reference this is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
import torch
import torch.nn.functional as F

from edgecm.corematching import BatchActivationStats, decode_neurons
from edgecm.errors import EdgecmError
from edgecm.kv_cache import PAD_ORDER, KVCache
from edgecm.model import decoder_layer
from edgecm.prompt import Prompt
from edgecm.sampling import next_token, seeded_generator
from edgecm.sparsity import SparsitySettings
from edgecm.token_pruning import Rows, TokenPruner
from runtime.budget import out_of_memory_message
from runtime.results import GenerationResult, Telemetry
from runtime.telemetry import LayerTimer, PeakRSS, Spans, nvml_snapshot

@dataclass
class _Sequence:
    """One sequence's state beside the padded tensors."""

    prompt: Prompt
    rows: Rows  # its live rows (hidden states are kept in the padded batch tensor between prunings)
    pruner: TokenPruner

    @property
    def length(self) -> int:
        return self.rows.length


def pad(parts: list[torch.Tensor], length: int, fill) -> torch.Tensor:
    """Stack tensors whose first dimension varies, padded with ``fill`` to ``length`` rows."""
    out = parts[0].new_full((len(parts), length, *parts[0].shape[1:]), fill)
    for b, part in enumerate(parts):
        out[b, : part.shape[0]] = part
    return out


def padded_rows(rows: list[Rows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's order (B, T) and rotary tables (B, 1, T, D); padding is PAD_ORDER and zero rotation."""
    length = max(r.length for r in rows)
    order = pad([r.order for r in rows], length, PAD_ORDER)
    cos = pad([r.cos for r in rows], length, 0.0)[:, None]
    sin = pad([r.sin for r in rows], length, 0.0)[:, None]
    return order, cos, sin


def generate_batch(
    engine,
    prompts: list[Prompt],
    settings,
    stop_token_ids: tuple[int, ...] = (),
    sparsity: SparsitySettings = SparsitySettings(),
    collect_logits: bool = False,
    forced_tokens: list[list[int]] | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt together; one GenerationResult per prompt, in order.

    ``settings`` is one GenerationSettings for all, or a list with one per prompt
    (max_new_tokens, sampling and seed, stop_at_eos act per sequence). Timings and
    the memory report describe the whole batch and are shared by its results:
    decode tokens/s is decode steps per second (each step gives a token to every
    live sequence), and the KV cache bytes are the batch's at their largest.
    ``forced_tokens`` (one list per prompt) teacher-forces each continuation, and ``sparsity``
    defaults to CoreMatching, as in ``Engine.generate``.
    """
    if not prompts:
        return []
    per_sequence = list(settings) if isinstance(settings, (list, tuple)) else [settings] * len(prompts)
    if len(per_sequence) != len(prompts):
        raise EdgecmError(f"{len(per_sequence)} generation settings for {len(prompts)} prompts; give one per prompt")
    for s in per_sequence:
        if s.max_new_tokens < 1:
            raise EdgecmError(f"--max-new-tokens {s.max_new_tokens}: must be at least 1")
    longest = max(p.num_tokens for p in prompts)
    new_tokens = max(s.max_new_tokens for s in per_sequence)
    if longest + new_tokens > engine.text.max_position_embeddings and engine.text.rope.rope_type != "dynamic":
        raise EdgecmError(
            f"prompt ({longest} tokens) + --max-new-tokens {new_tokens} exceeds the model's context of "
            f"{engine.text.max_position_embeddings}; shorten the prompt or lower --max-new-tokens"
        )
    images = max(int(p.image_positions.numel()) for p in prompts)
    plan = engine.plan_for(longest, images, new_tokens, sparsity, batch=len(prompts))
    engine.last_plan = plan
    engine.streamer.keep_as = engine._keep if (engine.force_resident or plan.layers_resident) else None
    try:
        with torch.inference_mode():
            return _run(engine, prompts, per_sequence, stop_token_ids, sparsity, collect_logits, forced_tokens)
    except torch.cuda.OutOfMemoryError:
        raise EdgecmError(out_of_memory_message(engine.device, engine.budget, f"a batch of {len(prompts)}")) from None


def _run(engine, prompts, per_sequence, stop_token_ids, sparsity, collect_logits, forced) -> list[GenerationResult]:
    spans = Spans(engine.device)
    engine.streamer.reset_counters()
    engine.timer = LayerTimer(engine.device)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    cache = KVCache(engine.text.num_layers, reserve_tokens=max(s.max_new_tokens for s in per_sequence))
    with PeakRSS() as rss:
        started = time.perf_counter()
        rows, hidden = _embed(engine, prompts, spans, sparsity)
        with spans.span("prefill"):
            placement, logits = _prefill(engine, rows, hidden, sparsity, cache)
        prefill_stream = engine.streamer.stats
        engine.streamer.reset_counters()
        if placement.moves_no_weights():
            engine.streamer.release_slots()
        first_token_s = time.perf_counter() - started
        with spans.span("decode"):
            finished = _decode(engine, rows, logits, per_sequence, stop_token_ids, cache, placement, collect_logits,
                               forced)
    decode_stream = engine.streamer.stats
    steps = max(len(f["tokens"]) for f in finished) - 1
    timings = engine._timings(spans, prefill_stream, decode_stream, first_token_s, finished[0]["latencies"], steps)
    memory = replace(engine._memory_report(rss, cache, placement, prefill_stream, decode_stream),
                     kv_cache_bytes=max(f["kv_bytes"] for f in finished))
    telemetry = Telemetry(nvml_snapshot(engine.device), prefill_stream, decode_stream)
    results = []
    for seq, done in zip(rows, finished):
        result = GenerationResult(
            token_ids=done["tokens"],
            prompt_tokens=seq.prompt.num_tokens,
            image_tokens=seq.pruner.image_tokens,
            stop_reason=done["stop_reason"],
            timings=timings,
            memory=memory,
            telemetry=telemetry,
            kept_image_tokens=seq.pruner.kept_tokens,
            kv_cache_tokens=done["kv_tokens"],
            core_neurons=placement.neuron_counts(),
            selection=seq.pruner.selection,
            logits=torch.stack(done["logits"]) if collect_logits else None,
            ffn_width=engine.text.intermediate_size,
            decode_neurons=placement.neurons,
        )
        results.append(result)
    return results


def _embed(engine, prompts: list[Prompt], spans: Spans, sparsity: SparsitySettings) -> tuple[list[_Sequence], torch.Tensor]:
    """Each prompt's embeddings, vision features in place, padded to the longest."""
    seqs = []
    embedded = engine.embed_batch(prompts, spans)  # the vision tower is loaded once for the batch
    for prompt, hidden in zip(prompts, embedded):
        seqs.append(_Sequence(prompt, *engine.start_sequence(hidden, prompt, sparsity)))
    return seqs, pad(embedded, max(q.length for q in seqs), 0.0)


def _prefill(engine, seqs: list[_Sequence], hidden: torch.Tensor, sparsity: SparsitySettings, cache: KVCache):
    """Every layer once over the padded batch; token pruning per sequence, one shared decode set."""
    text = engine.text
    collect = sparsity.mode == "corematching"
    placement = engine.new_placement()
    order, cos, sin = padded_rows([q.rows for q in seqs])
    for index, weights in engine.streamer.stream(range(text.num_layers)):
        core_rows = [q.pruner.core_rows(index, q.rows) for q in seqs]
        wants_core = any(r is not None for r in core_rows)
        stats = None
        if collect:
            stats = BatchActivationStats(
                sparsity.rho, [q.length for q in seqs], core_rows if wants_core else None,
                frequency=wants_core or sparsity.neurons.kind == "beta",
                reference_rows=[q.pruner.reference_row(index, q.rows) for q in seqs],
            )
        probes = [q.pruner.attention_probe(index, q.rows) for q in seqs]
        observe = per_sequence_observer(probes, [q.length for q in seqs]) if any(probes) else None
        with engine.timer.layer("prefill", index):
            hidden = decoder_layer(hidden, weights, text, cos, sin, order, cache, index,
                                   observer=stats, attention_observer=observe)
        neurons = decode_neurons(stats, sparsity, index, text.intermediate_size) if collect else None
        placement.place(index, weights, neurons)
        del weights
        if not any(index in q.pruner.layers for q in seqs):
            continue
        survivors = []
        for b, seq in enumerate(seqs):
            seq.rows.hidden = hidden[b, : seq.length]
            pruned = seq.pruner.after_layer(index, seq.rows, stats.parts[b] if stats is not None else None)
            if pruned is not None:
                seq.rows, kept = pruned
            else:
                kept = seq.rows.order
            survivors.append(kept)
        # Survivors keep their rotary tables and sequence indices; rows re-pad to the new longest.
        hidden = pad([q.rows.hidden for q in seqs], max(q.length for q in seqs), 0.0)
        order, cos, sin = padded_rows([q.rows for q in seqs])
        if not sparsity.keep_early_kv:
            for layer in range(index + 1):
                cache.keep_orders(layer, survivors)
    last = torch.tensor([q.length - 1 for q in seqs], device=engine.device)
    logits = engine.head(hidden[torch.arange(len(seqs), device=engine.device), last])  # (B, V)
    return placement, logits


def per_sequence_observer(probes: list, lengths: list[int]):
    """One attention observer for the padded batch: each sequence's probe reads its own queries over its
    own keys."""
    def observe(q: torch.Tensor, keys: torch.Tensor) -> None:
        for b, (probe, length) in enumerate(zip(probes, lengths)):
            if probe is not None:
                probe(q[b, :, :length], keys[b, :, :length])
    return observe


def _decode(engine, rows, logits, per_sequence, stop_token_ids, cache, placement, collect_logits, forced) -> list[dict]:
    """Decode steps for all live sequences together; a sequence that stops leaves the batch."""
    count = len(rows)
    generators = [seeded_generator(s.sampling.seed, engine.device) for s in per_sequence]  # where the logits are
    positions = [engine.family.next_position(engine.config, r.prompt) for r in rows]
    indices = [r.prompt.num_tokens for r in rows]
    done: list[dict | None] = [None] * count
    tokens: list[list[int]] = [[] for _ in range(count)]
    kept_logits: list[list[torch.Tensor]] = [[] for _ in range(count)]
    latencies: list[float] = []
    live = list(range(count))  # batch row i of the cache holds sequence live[i]
    while True:
        still = []
        for i, b in enumerate(live):
            if collect_logits:
                kept_logits[b].append(logits[i].cpu())
            if forced is not None and len(tokens[b]) < len(forced[b]):
                token = forced[b][len(tokens[b])]
            else:
                token = next_token(logits[i], per_sequence[b].sampling, generators[b])
            tokens[b].append(token)
            reason = None
            if per_sequence[b].stop_at_eos and token in stop_token_ids:
                reason = "eos"
            elif len(tokens[b]) >= per_sequence[b].max_new_tokens:
                reason = "length"
            if reason is None:
                still.append(i)
                continue
            live_kv = [cache.live(layer)[i] for layer in range(engine.text.num_layers)]
            done[b] = {"tokens": tokens[b], "stop_reason": reason, "logits": kept_logits[b],
                       "kv_tokens": live_kv, "kv_bytes": cache.nbytes(), "latencies": latencies}
        if not still:
            break
        if len(still) < len(live):
            cache.select_rows(torch.tensor(still, device=engine.device))
            live = [live[i] for i in still]
        step_started = time.perf_counter()
        ids = torch.tensor([[tokens[b][-1]] for b in live], device=engine.device)
        order = torch.tensor([[indices[b]] for b in live], device=engine.device)
        cos, sin = engine.rotary.cos_sin(torch.tensor([positions[b] for b in live], device=engine.device), engine.dtype)
        hidden = engine.run_layers(F.embedding(ids, engine.embed_tokens), None, order, cache, placement,
                                   cos_sin=(cos[:, None, None], sin[:, None, None]))
        logits = engine.head(hidden[:, -1])  # (B', V)
        logits[0, 0].item()  # waits for the device, so the step's time is its real latency
        latencies.append(time.perf_counter() - step_started)
        for b in live:
            positions[b] += 1
            indices[b] += 1
    return done
