"""CoreMatching's selection rules as pure functions over tensors.

Notation as in the specification: for a token t, ``h_t`` is the FFN's
down_proj input (length F). ``G(t) = {n : h_t[n] > 0}`` are its activated
neurons; ``C_rho(t)`` the ``ceil(rho * |G(t)|)`` largest of them; ``f(n)`` the
number of prompt tokens whose ``C_rho`` contains n. Sentence-wise core
neurons are the ``ceil(beta * F)`` neurons of largest f.

Every ranking here breaks ties by the lower index first (stable sorts), so
results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def stable_desc_order(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices that sort ``values`` descending; equal values keep ascending index order."""
    return torch.sort(values, dim=dim, descending=True, stable=True).indices


def token_core_frequency(h: torch.Tensor, rho: float) -> torch.Tensor:
    """f(n) over the tokens of ``h`` (T, F): how many tokens have n among their top-rho positive activations.

    A token with no positive activation contributes nothing. Per token only the
    k_t-th largest value matters, so one ``topk`` to the largest k_t replaces a
    full sort; entries equal to that threshold are taken in index order until
    k_t are chosen (the lower-index tie rule).
    """
    h = h.reshape(-1, h.shape[-1])
    positives = (h > 0).sum(dim=-1)  # (T,) |G(t)|
    k = torch.ceil(rho * positives.to(torch.float64)).to(torch.long)  # (T,) ceil(rho |G(t)|)
    rows = (k > 0).nonzero().flatten()
    if rows.numel() == 0:
        return torch.zeros(h.shape[-1], dtype=torch.long, device=h.device)
    h, k = h[rows], k[rows]
    top = torch.topk(h, int(k.max()), dim=-1, sorted=True).values  # (T', k_max)
    threshold = top.gather(1, (k - 1)[:, None])  # (T', 1) the k_t-th largest, positive by construction
    above = h > threshold
    ties = h == threshold
    room = k[:, None] - above.sum(dim=-1, keepdim=True)
    in_core = above | (ties & (ties.cumsum(dim=-1) <= room))
    return in_core.sum(dim=0)


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``ceil(fraction * len)`` indices of largest score (ties: lower index), returned ascending."""
    count = min(scores.numel(), max(1, math.ceil(fraction * scores.numel())))
    return torch.sort(stable_desc_order(scores)[:count]).values


def core_neurons(frequency: torch.Tensor, beta: float) -> torch.Tensor:
    """Sentence-wise core neurons: the ceil(beta * F) neurons of largest f(n), ascending."""
    return top_fraction(frequency, beta)


def mass_budget_neurons(mass: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest neurons whose summed activation mass (sum over tokens of |h|) reaches ``share`` of the total.

    Returned ascending. A layer with no mass at all keeps one neuron (the first).
    """
    order = stable_desc_order(mass.double())
    total = float(mass.double().sum())
    if total <= 0:
        return order[:1].sort().values
    cumulative = mass.double()[order].cumsum(0)
    count = int(torch.searchsorted(cumulative, share * total).item()) + 1
    return torch.sort(order[: min(count, mass.numel())]).values


def match_scores(h_image: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """score(i) = |G(i) intersect Core(K)| for image tokens h_image (N, F)."""
    return (h_image[:, core] > 0).sum(dim=-1)


def reference_match_scores(h_image_positive: torch.Tensor, reference_positive: torch.Tensor) -> torch.Tensor:
    """core-ref: score(i) = |G(i) intersect G(r)|, from G(i) (N, F) and G(r) (F,) as booleans."""
    return (h_image_positive & reference_positive).sum(dim=-1)


def knee_index(sorted_desc: torch.Tensor) -> int:
    """j*: the first index of maximum perpendicular distance from the chord (first point, last point).

    Axis scaling does not move j*, so raw indices and scores are used. Fewer
    than three points, or all on the chord, give 0.
    """
    m = sorted_desc.numel()
    if m < 3:
        return 0
    y = sorted_desc.to(torch.float64)
    x = torch.arange(m, dtype=torch.float64)
    dx, dy = float(m - 1), float(y[-1] - y[0])
    # |cross((dx, dy), (x - x0, y - y0))| / |chord|; the norm is constant so it is left out.
    distance = (dx * (y - y[0]) - dy * x).abs()
    return int(torch.argmax(distance).item())  # argmax returns the first maximum


def knee_keep(scores: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of tokens whose score reaches the knee threshold tau = s_{j*}."""
    if scores.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    sorted_desc = torch.sort(scores, descending=True, stable=True).values
    tau = sorted_desc[knee_index(sorted_desc)]
    return (scores >= tau).nonzero().flatten()


def top_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` largest scores, ties to the lower index."""
    count = max(0, min(count, scores.numel()))
    return torch.sort(stable_desc_order(scores)[:count]).values


def head_mean_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_kv_groups: int, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities of some queries over the keys, averaged over heads: what the attention-based
    rankings read off a layer's own q and k (fused attention does not return them).

    queries: (H, R, D) rotary-embedded; keys: (H_kv, S, D); visible: (R, S) bool, the causal rule, or
    None where every query sees every key. Returns (R, S).
    """
    keys = keys.repeat_interleave(num_kv_groups, dim=0)  # (H, S, D)
    logits = torch.einsum("hrd,hsd->hrs", queries.float(), keys.float()) / math.sqrt(queries.shape[-1])
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return F.softmax(logits, dim=-1).mean(dim=0)


def fastv_scores(q_last: torch.Tensor, keys: torch.Tensor, num_kv_groups: int) -> torch.Tensor:
    """Attention each position receives from the last prompt token, averaged over heads.

    q_last: (H, D) rotary-embedded query of the last token; keys: (H_kv, T, D)
    rotary-embedded keys of all prompt tokens, all visible to it. Returns (T,).
    """
    return head_mean_attention(q_last[:, None], keys, num_kv_groups)[0]


def random_scores(count: int, seed: int) -> torch.Tensor:
    """A seeded random ranking of ``count`` tokens (the random baseline)."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed))


class LayerActivationStats:
    """An FFN observer for one prefill layer: f(n), activation mass, and (at layer K) image-token positivity.

    It reduces the (T, F) activations to (F,) statistics on the spot, so no
    second pass over the layer and no copy of the activations is needed.
    """

    def __init__(self, rho: float, image_rows: torch.Tensor | None = None, frequency: bool = True,
                 reference_row: int | None = None):
        self.rho = rho
        self.image_rows = image_rows  # rows of the current sequence that hold image tokens
        self.reference_row = reference_row  # core-ref's reference text token r, where it ranks
        # f(n) costs a top-k per token; it is skipped in layers whose choice does not use it.
        self.want_frequency = frequency
        self.frequency: torch.Tensor | None = None  # (F,) f(n)
        self.mass: torch.Tensor | None = None  # (F,) sum over tokens of |h|
        self.image_positive: torch.Tensor | None = None  # (N_image, F) bool, G(i) for image tokens
        self.reference_positive: torch.Tensor | None = None  # (F,) bool, G(r)

    def __call__(self, h: torch.Tensor) -> None:
        h = h[0]  # (T, F); batch size 1
        if self.want_frequency:
            self.frequency = token_core_frequency(h, self.rho)
        self.mass = h.abs().sum(dim=0, dtype=torch.float32)
        if self.image_rows is not None:
            self.image_positive = h[self.image_rows] > 0
        if self.reference_row is not None:
            self.reference_positive = h[self.reference_row] > 0


class BatchActivationStats:
    """The FFN observer of one prefill layer over a padded batch: one LayerActivationStats per sequence
    (its own rows only, for its own core tokens at layer K) and their sum for the batch's one decode set.

    Pooling adds f(n) and the activation mass over all sequences' tokens: the same statistic as one
    sequence's, counted over every token the batch holds.
    """

    def __init__(self, rho: float, lengths: list[int], image_rows: list[torch.Tensor] | None, frequency: bool,
                 reference_rows: list[int | None] | None = None):
        self.lengths = lengths  # live rows of each sequence (a prefix of its padded row)
        rows = image_rows or [None] * len(lengths)
        references = reference_rows or [None] * len(lengths)
        self.parts = [LayerActivationStats(rho, r, frequency, ref) for r, ref in zip(rows, references)]

    def __call__(self, h: torch.Tensor) -> None:
        for b, part in enumerate(self.parts):
            part(h[b : b + 1, : self.lengths[b]])

    @property
    def frequency(self) -> torch.Tensor | None:
        parts = [p.frequency for p in self.parts]
        return None if parts[0] is None else torch.stack(parts).sum(dim=0)

    @property
    def mass(self) -> torch.Tensor:
        return torch.stack([p.mass for p in self.parts]).sum(dim=0)


def decode_neurons(stats: LayerActivationStats, settings, layer: int, width: int) -> torch.Tensor | None:
    """The neurons layer ``layer`` decodes with, ascending; None keeps the layer dense.

    ``settings`` is an edgecm.sparsity.SparsitySettings.
    """
    if not settings.sparse_neurons or layer in settings.dense_layers:
        return None
    if settings.neurons.kind == "beta":
        return core_neurons(stats.frequency, settings.neurons.share)
    chosen = mass_budget_neurons(stats.mass, settings.neurons.share)
    # Slicing a layer that needs nearly all its neurons saves little and costs fidelity.
    return None if chosen.numel() > settings.dense_above * width else chosen


@dataclass
class TokenSelection:
    keep: torch.Tensor  # indices into the image tokens, ascending
    core_scores: torch.Tensor  # (N,) |G(i) intersect Core(K)| for every image token (core-ref: |G(i) ∩ G(r)|)
    knee_threshold: int | None  # tau of the knee on core_scores (None for an empty image span)
    recycled: int = 0  # aggregate tokens among the kept (SparseVLM's recycling)
    stage_tokens: tuple[int, ...] = ()  # visual tokens left after each stage (SparseVLM prunes in stages)
    stage_dropped: tuple[torch.Tensor, ...] = ()  # image tokens each stage removed
    stage_layers: tuple[int, ...] = ()  # the layer each stage read (the next layer is the first without them)


def select_image_tokens(
    settings, stats: LayerActivationStats, fastv: torch.Tensor | None = None
) -> TokenSelection:
    """Apply the token rule and ranking of ``settings`` (SparsitySettings) to the image tokens, read at layer K-1."""
    if not stats.image_positive.numel():
        scores = torch.zeros(0, dtype=torch.long)
    elif settings.token_rank == "core-ref":
        scores = reference_match_scores(stats.image_positive, stats.reference_positive)
    else:
        scores = match_scores(stats.image_positive, core_neurons(stats.frequency, settings.beta))
    n = scores.numel()
    knee = knee_keep(scores)
    tau = int(scores[knee].min()) if knee.numel() else None
    rule = settings.tokens
    if rule.kind == "all":
        return TokenSelection(torch.arange(n), scores, tau)
    if rule.kind == "knee" and settings.token_rank in ("core", "core-ref"):
        return TokenSelection(knee, scores, tau)
    fixed = rule.fixed_count(n)
    count = knee.numel() if fixed is None else fixed  # at the knee, the baselines keep as many as the knee would
    ranking = {"core": scores, "core-ref": scores, "fastv": fastv, "random": random_scores(n, settings.seed) if n else scores}[
        settings.token_rank
    ]
    return TokenSelection(top_count(ranking, count), scores, tau)
