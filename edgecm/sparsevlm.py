"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided visual-token pruning, as pure functions.

The method, as its paper and released code describe it, and what edgecm does:

1. Raters. Once, on the embedded prompt (the input of layer 0), each text
   token after the image is scored by how much the visual tokens point at it:
   ``relevance = softmax_text(V T^T)`` averaged over the visual tokens. The
   text tokens whose relevance is above the mean are the raters.
2. Scores. At each pruning layer, the raters' attention probabilities (the
   layer's own queries and keys, causal, mean over heads) over the visual
   tokens present form the relation matrix P (raters x visual); a visual
   token's score is its column mean.
3. How many. The paper deletes ``lambda * (L_v - rank(P))`` tokens; the code
   keeps ``scale * rank(P)`` (at most L_v - 1), scale 13.5 for 576 tokens. We
   follow the code, with the scale taken per token of the image
   (``13.5 / 576`` of the image's token count), so the same share is kept
   on images of other sizes. A target budget (``count:N``, ``ratio:R``) fixes
   what leaves the last stage, and bounds the earlier stages from below.
4. Progressive. Stages at layers 2, 6 and 15 of LLaVA-1.5-7B's 32 in the
   code (the paper's first release also pruned at 19); on other depths the
   same fractions of the depth. Each stage's layer runs on every token still
   present; its output is pruned, so in edgecm's K terms the stages are
   K = 3, 7 and 16.
5. Recycling. Of the tokens a stage drops, the most relevant 30 % (+1) are
   clustered (density-peak clustering over their hidden states, one cluster
   per 10 tokens, +1) and each cluster is replaced by the mean of its
   members: aggregate tokens that take part in later stages as visual tokens.

Where the code differs from the paper, edgecm follows the code (steps 3 and 4
above). Where edgecm differs from the code, and why:
- The code adds random noise (1e-6) to break density ties; here ties go to
  the lower index, so results are deterministic.
- The code appends aggregate tokens after the kept visual tokens and then
  renumbers every position id from 0. edgecm never renumbers (kept tokens
  keep their rotary positions), so an aggregate token takes the place of its
  cluster's centre, a dropped token: the centre's rotary position and
  sequence index. It sits inside the image span, in order.
- Under a target budget, the last stage's split between selected and
  aggregate tokens is solved so that the two add up to the budget exactly.
"""

from __future__ import annotations

import math

import torch

from edgecm.corematching import stable_desc_order

PAPER_DEPTH = 32  # LLaVA-1.5-7B's decoder layers
PAPER_STAGE_LAYERS = (2, 6, 15)  # the code's pruning layers (scored on, then pruned after)
PAPER_IMAGE_TOKENS = 576
RANK_SCALE = 13.5  # tokens kept per unit of rank(P) on 576 image tokens (the code's default)
RECYCLE_SHARE = 0.3  # share of a stage's dropped tokens (the most relevant, +1) that is recycled
TOKENS_PER_CLUSTER = 10  # one aggregate token per this many recycled tokens (+1)


def stage_layers(num_layers: int, first_k: int | None = None) -> tuple[int, ...]:
    """The scoring layers of the stages for a decoder of ``num_layers``: the code's layers as depth fractions.

    Rounded half up; layers that coincide on a shallow model are one stage. With ``first_k`` the first
    stage scores layer ``first_k - 1`` (so layer ``first_k`` is the first without its dropped tokens, K as
    FastV counts it) and the later stages keep their distance from it, up to the last layer.
    """
    published = sorted({min(num_layers - 1, math.floor(layer * num_layers / PAPER_DEPTH + 0.5))
                        for layer in PAPER_STAGE_LAYERS})
    if first_k is None:
        return tuple(published)
    return tuple(sorted({min(num_layers - 1, first_k - 1 + layer - published[0]) for layer in published}))


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) into ``text`` (M, d) of the raters: text tokens more relevant to ``visual`` (N, d)
    than the mean text token. All of them if none is above the mean (every relevance equal)."""
    relevance = (visual.float() @ text.float().T).softmax(dim=-1).mean(dim=0)  # (M,)
    raters = (relevance > relevance.mean()).nonzero().flatten()
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def rank_target(relation: torch.Tensor, image_tokens: int, scale: float = RANK_SCALE) -> int:
    """The rank rule: visual tokens a stage keeps, ``scale * rank(P)``, the scale given per 576 image tokens."""
    rank = int(torch.linalg.matrix_rank(relation.float()).item())
    # Capped at the image's tokens before int(): a huge finite scale would otherwise overflow to inf.
    return int(min(image_tokens, rank * scale * image_tokens / PAPER_IMAGE_TOKENS))


def recycle_candidates(dropped: int) -> int:
    """How many of a stage's dropped tokens (the most relevant) are clustered."""
    return min(dropped, int(RECYCLE_SHARE * dropped) + 1)


def recycled_count(dropped: int) -> int:
    """Aggregate tokens made from ``dropped`` tokens: one per 10 of the recycled 30 % (+1 each)."""
    if dropped <= 0:
        return 0
    return recycle_candidates(dropped) // TOKENS_PER_CLUSTER + 1


def split_budget(target: int, present: int, recycle: bool) -> tuple[int, int]:
    """(selected, aggregate) tokens for a stage that should leave ``target`` of ``present`` visual tokens.

    With recycling, the most selected tokens whose aggregates still fit; the
    aggregates are then exactly ``recycled_count`` of the dropped, and the two
    add up to ``target``. Where no split fits (a target smaller than the
    aggregates alone), the stage recycles nothing.
    """
    if target >= present:
        return present, 0
    if recycle:
        for kept in range(target, -1, -1):
            if kept + recycled_count(present - kept) <= target:
                return kept, target - kept
    return target, 0


def cluster_and_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering (DPC-kNN) of ``x`` (n, d) into ``clusters`` groups, each merged to its mean.

    density(i) = exp(-mean of the squared distances to its ``clusters`` nearest
    points (itself included)), distances divided by sqrt(d) as the code does;
    delta(i) = the distance to the nearest denser point (the largest distance
    for the densest); centres = the largest density * delta; every point
    joins its nearest centre. Ties go to the lower index.

    Returns (merged (clusters, d) in x's dtype, centres (clusters,) indices into x, assignment (n,)).
    """
    n, d = x.shape
    clusters = max(1, min(clusters, n))
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)  # (n, n)
    nearest = torch.topk(dist, clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[stable_desc_order(density)] = torch.arange(n, device=x.device)  # 0: the densest
    denser = rank[None, :] < rank[:, None]  # (i, j): j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = stable_desc_order(delta * density)[:clusters]
    assignment = dist[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, d, dtype=torch.float32, device=x.device).index_add_(0, assignment, xf)
    counts = torch.bincount(assignment, minlength=clusters).clamp(min=1)
    return (sums / counts[:, None]).to(x.dtype), centres, assignment
