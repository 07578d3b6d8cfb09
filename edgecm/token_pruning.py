"""Token pruning of one sequence through prefill: which layers rank the visual tokens, and what survives.

The prefill loops (one sequence in runtime/engine.py, a padded batch in
runtime/batch.py) hold one ``TokenPruner`` per sequence and ask it, layer by
layer, what to observe and, after a ranking layer, which rows go on. The
rules live here once for both loops:

- ``core``, ``core-ref``, ``fastv``, ``random``: one stage. Layer K-1 is read
  (its FFN activations, or its attention from the last prompt token); layer K
  is the first without the dropped tokens, as in FastV. ``core-ref`` also reads
  the activations of its reference text token r (the prompt's
  ``reference_index``; the last prompt token where a prompt has none).
- ``sparsevlm``: several stages at its own layers (edgecm.sparsevlm), each
  read from that layer's attention by the text raters, with recycling.

Rows stay in sequence order. Every kept row keeps its rotary position and
sequence index; an aggregate (recycled) token takes its cluster centre's.
After a stage, the caller prunes the KV cache of the layers run so far to
``survivors`` (the sequence indices of the rows that were there and stay),
unless early KV entries are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from edgecm import sparsevlm
from edgecm.errors import EdgecmError
from edgecm.corematching import (
    LayerActivationStats,
    TokenSelection,
    fastv_scores,
    head_mean_attention,
    select_image_tokens,
    top_count,
)

TEXT, RECYCLED = -1, -2  # ``source`` of rows that are not an original image token


@dataclass
class Rows:
    """One sequence's live prefill rows, in sequence order."""

    hidden: torch.Tensor  # (T, d)
    positions: torch.Tensor  # (T,) or (3, T) rotary ids
    order: torch.Tensor  # (T,) sequence indices, ascending
    cos: torch.Tensor  # (T, D)
    sin: torch.Tensor
    source: torch.Tensor  # (T,) index of the original image token, TEXT or RECYCLED

    @property
    def length(self) -> int:
        return int(self.order.numel())

    @property
    def visual(self) -> torch.Tensor:
        """Rows holding visual tokens: original image (or video) tokens and aggregates."""
        return (self.source != TEXT).nonzero().flatten()

    def take(self, rows: torch.Tensor) -> "Rows":
        return Rows(self.hidden[rows], self.positions[..., rows], self.order[rows], self.cos[rows], self.sin[rows],
                    self.source[rows])

    def joined(self, other: "Rows") -> "Rows":
        """Both sets of rows, merged into sequence order."""
        joined = Rows(torch.cat([self.hidden, other.hidden]), torch.cat([self.positions, other.positions], dim=-1),
                      torch.cat([self.order, other.order]), torch.cat([self.cos, other.cos]),
                      torch.cat([self.sin, other.sin]), torch.cat([self.source, other.source]))
        return joined.take(torch.sort(joined.order, stable=True).indices)


# Called with one sequence's rotary-embedded queries (H, T, D) and its keys (H_kv, T, D) at a ranking layer.
SequenceAttentionProbe = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class _Stage:
    """One SparseVLM stage, as the selection reports it."""

    tokens: int  # visual tokens it left (aggregates included)
    dropped: torch.Tensor  # original image tokens it removed (indices into the image tokens)


@dataclass
class TokenPruner:
    """The pruning state of one sequence. ``settings`` is an edgecm.sparsity.SparsitySettings."""

    settings: object
    num_layers: int
    num_kv_groups: int
    image_tokens: int
    raters: torch.Tensor | None = None  # sequence indices of the SparseVLM raters
    reference: int | None = None  # core-ref: the sequence index of the reference token r
    layers: tuple[int, ...] = ()  # layers after which this sequence is pruned
    selection: TokenSelection | None = None
    stages: list[_Stage] = field(default_factory=list)  # SparseVLM's, one per stage run
    _scores: torch.Tensor | None = None  # what the attention probe read at the current layer

    @classmethod
    def start(cls, settings, num_layers: int, num_kv_groups: int, rows: Rows,
              reference_index: int | None = None) -> "TokenPruner":
        """A pruner for a sequence entering layer 0 as ``rows`` (its embedded prompt); ``reference_index`` is
        core-ref's reference token (None: the last prompt token)."""
        visual = rows.visual
        pruner = cls(settings, num_layers, num_kv_groups, int(visual.numel()))
        pruner.reference = int(rows.order[-1]) if reference_index is None else reference_index
        if not settings.prunes_tokens or not visual.numel():
            return pruner
        settings.check_layers(num_layers)
        pruner.layers = settings.ranking_layers(num_layers)
        if settings.token_rank != "sparsevlm":
            return pruner
        # The raters are text tokens after the image (the question), as in the released code.
        text = (rows.source == TEXT).nonzero().flatten()
        after = text[text > visual.max()]
        candidates = after if after.numel() else text
        if candidates.numel():
            chosen = sparsevlm.select_raters(rows.hidden[visual], rows.hidden[candidates])
            pruner.raters = rows.order[candidates[chosen]]
        else:
            pruner.layers = ()  # an image with no text at all: nothing to rate it with
        return pruner

    # -- what a layer must observe --------------------------------------------------------------

    def core_rows(self, layer: int, rows: Rows) -> torch.Tensor | None:
        """Visual rows whose FFN activations G(i) the observer must keep at ``layer`` (core matching's
        scores, which also size the baselines at the knee); None where none are needed."""
        if self.settings.token_rank == "sparsevlm" or layer not in self.layers:
            return None
        return rows.visual

    def reference_row(self, layer: int, rows: Rows) -> int | None:
        """The row of core-ref's reference token, whose G(r) the observer must keep at ``layer``."""
        if self.settings.token_rank != "core-ref" or layer not in self.layers:
            return None
        reference = torch.tensor([self.reference], device=rows.order.device)
        return int(torch.searchsorted(rows.order, reference))

    def attention_probe(self, layer: int, rows: Rows) -> SequenceAttentionProbe | None:
        """What reads this layer's attention for the ranking, if the ranking needs it here."""
        if layer not in self.layers or self.settings.token_rank not in ("fastv", "sparsevlm"):
            return None
        if self.settings.token_rank == "fastv":
            def probe(q: torch.Tensor, keys: torch.Tensor) -> None:
                # FastV: attention from the last prompt token, which sees every key.
                self._scores = fastv_scores(q[:, -1], keys, self.num_kv_groups)
            return probe
        rater_rows = torch.searchsorted(rows.order, self.raters.to(rows.order.device))
        visual = rows.visual

        def probe(q: torch.Tensor, keys: torch.Tensor) -> None:
            columns = torch.arange(keys.shape[1], device=keys.device)
            visible = columns[None, :] <= rater_rows[:, None]  # rows are in sequence order: causal by row
            relation = head_mean_attention(q[:, rater_rows], keys, self.num_kv_groups, visible)  # (R, T)
            self._scores = relation[:, visual]  # P: raters x visual tokens
        return probe

    # -- pruning ------------------------------------------------------------------------------------

    def after_layer(self, layer: int, rows: Rows, stats: LayerActivationStats | None) -> tuple[Rows, torch.Tensor] | None:
        """The rows that go on after ``layer`` and the sequence indices of the survivors among the rows
        that were there (what the KV cache of layers 0..layer keeps); None where nothing is pruned."""
        if layer not in self.layers:
            return None
        if self.settings.token_rank == "sparsevlm":
            return self._sparsevlm_stage(layer, rows)
        visual = rows.visual
        fastv = self._scores[visual] if self._scores is not None else None
        self.selection = select_image_tokens(self.settings, stats, fastv)
        kept = rows.take(self._with_text(rows, visual[self.selection.keep.to(visual.device)]))
        return kept, kept.order

    def _with_text(self, rows: Rows, visual_rows: torch.Tensor) -> torch.Tensor:
        """Every text row and the given visual rows, in order."""
        keep = rows.source == TEXT
        keep[visual_rows] = True
        return keep.nonzero().flatten()

    def _sparsevlm_stage(self, layer: int, rows: Rows) -> tuple[Rows, torch.Tensor]:
        relation, self._scores = self._scores, None
        visual = rows.visual
        present = int(visual.numel())
        relevance = relation.mean(dim=0)  # (N_visual,)
        budget = self.settings.tokens.fixed_count(self.image_tokens)
        if budget is not None and layer == self.layers[-1]:
            target = budget
        else:
            # The rank rule; it drops at least one token (as the code does), and never goes below the budget.
            ranked = sparsevlm.rank_target(relation, self.image_tokens, self.settings.rank_scale)
            target = max(budget or 1, min(ranked, present - 1))
        selected, aggregates = sparsevlm.split_budget(target, present, self.settings.recycle)
        chosen = top_count(relevance, selected)
        keep = self._with_text(rows, visual[chosen])
        kept = rows.take(keep)
        survivors = kept.order
        if aggregates:
            dropped = torch.ones(present, dtype=torch.bool, device=relevance.device)
            dropped[chosen] = False
            dropped = dropped.nonzero().flatten()
            candidates = dropped[top_count(relevance[dropped], sparsevlm.recycle_candidates(int(dropped.numel())))]
            candidate_rows = visual[candidates]
            merged, centres, _ = sparsevlm.cluster_and_merge(rows.hidden[candidate_rows], aggregates)
            made = rows.take(candidate_rows[centres])
            made = replace(made, hidden=merged, source=torch.full_like(made.source, RECYCLED))
            kept = kept.joined(made)
        before, after = rows.source[rows.source >= 0], kept.source[kept.source >= 0]
        dropped = before[~torch.isin(before, after)].sort().values.cpu()
        self.stages.append(_Stage(int(kept.visual.numel()), dropped))
        self.selection = TokenSelection(after.sort().values.cpu(), torch.zeros(0, dtype=torch.long), None,
                                        recycled=int((kept.source == RECYCLED).sum()),
                                        stage_tokens=tuple(s.tokens for s in self.stages),
                                        stage_dropped=tuple(s.dropped for s in self.stages),
                                        stage_layers=self.layers[: len(self.stages)])
        return kept, survivors

    @property
    def kept_tokens(self) -> int:
        """Visual tokens left after pruning (SparseVLM's aggregates included)."""
        if self.selection is None:
            return self.image_tokens
        return int(self.selection.keep.numel()) + self.selection.recycled
