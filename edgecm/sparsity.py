"""What a CoreMatching run prunes: one frozen settings record, parsed from the user's spellings.

    --mode dense|corematching
    --tokens knee | all | count:N | ratio:R        how many image tokens reach layer K and after
    --token-rank core | core-ref | fastv | random | sparsevlm
                                                   which ones (core matching, the released code's criterion,
                                                   FastV, seeded random, SparseVLM)
    --neurons beta:B | mass:S | dense              decode FFN neurons per layer
    --rho R --beta B --prune-layer K --dense-above F --dense-layers 0,1,29 --keep-early-kv
    --no-recycle --rank-scale S                  SparseVLM's recycling and rank rule

K means what it means in FastV: layers 0..K-1 see every token, the
ranking reads layer K-1 (its FFN activations for ``core``, its attention for
``fastv``), and layer K is the first that runs without the dropped tokens.

``core-ref`` is the released code's criterion: score(i) = |G(i) intersect G(r)|, r one reference
text token, the first token of the assistant's header in the chat template (``Prompt.reference_index``),
instead of the sentence-wise core neurons; it has a knee of its own.

With ``--token-rank fastv`` or ``random`` and ``--tokens knee`` the baseline
keeps exactly as many tokens as the CoreMatching knee would, so the three
rankings are compared at the same budget.

``sparsevlm`` is a ranking too (text raters' attention instead of core
neurons), because it shares everything else: the budgets, the KV-cache
rule, the sparse decode. It prunes in stages at its own layers (see
edgecm.sparsevlm), so ``--prune-layer`` does not apply to it (``--sparsevlm-k K`` moves its first stage to
layer K-1, the later ones keeping their distance); ``count:N`` and
``ratio:R`` are the visual tokens left after its last stage, recycled tokens
included, and ``knee`` (the adaptive rule) is SparseVLM's own adaptive
count, the rank rule, at every stage. ``--no-recycle`` drops pruned tokens
instead of merging some of them into aggregate tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from edgecm.errors import EdgecmError
from edgecm.sparsevlm import stage_layers

TOKEN_RANKS = ("core", "core-ref", "fastv", "random", "sparsevlm")
MODES = ("dense", "corematching")


@dataclass(frozen=True)
class TokenRule:
    kind: str = "knee"  # "knee" | "all" | "count" | "ratio"
    value: float = 0.0

    @staticmethod
    def parse(text: str) -> "TokenRule":
        name, _, arg = text.partition(":")
        try:
            if name in ("knee", "all") and not arg:
                return TokenRule(name)
            if name == "count" and int(arg) >= 1:
                return TokenRule("count", int(arg))
            if name == "ratio" and 0 < float(arg) <= 1:
                return TokenRule("ratio", float(arg))
        except ValueError:
            pass
        raise EdgecmError(f"--tokens {text}: use knee, all, count:N (N >= 1) or ratio:R (0 < R <= 1)")

    def fixed_count(self, image_tokens: int) -> int | None:
        """How many of ``image_tokens`` a count:N or ratio:R rule keeps; None for the adaptive rules."""
        if self.kind == "count":
            return int(self.value)
        if self.kind == "ratio":
            return math.ceil(self.value * image_tokens)
        return None

    def __str__(self) -> str:
        if self.kind in ("knee", "all"):
            return self.kind
        return f"{self.kind}:{int(self.value) if self.kind == 'count' else self.value:g}"


@dataclass(frozen=True)
class NeuronBudget:
    kind: str = "mass"  # "beta" | "mass" | "dense"
    # beta: the fraction of neurons kept (top by frequency f(n)); mass: the share of activation mass kept.
    share: float = 0.0

    @staticmethod
    def parse(text: str) -> "NeuronBudget":
        name, _, arg = text.partition(":")
        try:
            if name == "dense" and not arg:
                return NeuronBudget("dense")
            if name in ("beta", "mass") and 0 < float(arg) <= 1:
                return NeuronBudget(name, float(arg))
        except ValueError:
            pass
        raise EdgecmError(f"--neurons {text}: use beta:B, mass:S (0 < B, S <= 1) or dense")

    def __str__(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}:{self.share:g}"


@dataclass(frozen=True)
class SparsitySettings:
    """Defaults are the ones bench/results/fidelity-smollm2-cpu.md supports (see README)."""

    mode: str = "corematching"
    rho: float = 0.2
    beta: float = 0.4  # sentence-wise core fraction at layer K, for token matching
    prune_layer: int = 2
    tokens: TokenRule = field(default_factory=TokenRule)
    token_rank: str = "core"
    neurons: NeuronBudget = field(default_factory=lambda: NeuronBudget("mass", 0.98))
    # Under a mass budget, a layer that needs more than this fraction of its neurons stays dense.
    dense_above: float = 0.9
    dense_layers: tuple[int, ...] = ()
    keep_early_kv: bool = False
    recycle: bool = True  # sparsevlm: merge the most relevant pruned tokens into aggregate tokens
    # sparsevlm's rank rule: visual tokens kept per unit of rank(P) on 576 image tokens (the released code's
    # --scale: 13.5 by default, 9 for POPE, 0.8 for TextVQA), scaled to the image's own token count.
    rank_scale: float = 13.5
    # sparsevlm: the K of its first stage (layer K-1 scores, the later stages keep their distance); None: the
    # published layers scaled by depth.
    sparsevlm_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EdgecmError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        if self.token_rank not in TOKEN_RANKS:
            raise EdgecmError(f"--token-rank {self.token_rank}: use one of {', '.join(TOKEN_RANKS)}")
        if not 0 < self.rho <= 1:
            raise EdgecmError(f"--rho {self.rho}: must be in (0, 1]")
        if not 0 < self.beta <= 1:
            raise EdgecmError(f"--beta {self.beta}: must be in (0, 1]")
        if self.prune_layer < 1:
            # Layer K-1 is read to rank the tokens, so at least one layer sees them all.
            raise EdgecmError(f"--prune-layer {self.prune_layer}: must be >= 1 (layers 0..K-1 see every token)")
        if not (math.isfinite(self.rank_scale) and self.rank_scale > 0):
            raise EdgecmError(f"--rank-scale {self.rank_scale}: must be a positive number")
        if not 0 < self.dense_above <= 1:
            raise EdgecmError(f"--dense-above {self.dense_above}: must be in (0, 1]")
        if self.sparsevlm_k is not None and self.sparsevlm_k < 1:
            raise EdgecmError(f"--sparsevlm-k {self.sparsevlm_k}: must be >= 1 (layers 0..K-1 see every token)")

    def check_layers(self, num_layers: int) -> None:
        """Refuse layer numbers the model does not have (before any weight is read)."""
        if self.mode != "corematching":
            return
        if self.token_rank != "sparsevlm" and self.prune_layer >= num_layers:
            raise EdgecmError(f"--prune-layer {self.prune_layer}: the model has {num_layers} layers, 0..{num_layers - 1}")
        if self.sparsevlm_k is not None and self.sparsevlm_k >= num_layers:
            raise EdgecmError(f"--sparsevlm-k {self.sparsevlm_k}: the model has {num_layers} layers, "
                              f"0..{num_layers - 1}")
        beyond = [layer for layer in self.dense_layers if layer >= num_layers]
        if beyond:
            raise EdgecmError(
                f"--dense-layers {','.join(map(str, self.dense_layers))}: layer {beyond[0]} does not exist; "
                f"the model has {num_layers} layers, 0..{num_layers - 1}"
            )

    def ranking_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose output ranks the visual tokens (each is followed by a pruning): K-1, or
        SparseVLM's stage layers."""
        if self.token_rank == "sparsevlm":
            return stage_layers(num_layers, self.sparsevlm_k)
        return (self.prune_layer - 1,)

    @property
    def prunes_tokens(self) -> bool:
        return self.mode == "corematching" and self.tokens.kind != "all"

    @property
    def sparse_neurons(self) -> bool:
        return self.mode == "corematching" and self.neurons.kind != "dense"

    def to_json(self) -> dict:
        record = asdict(self)
        record["tokens"], record["neurons"] = str(self.tokens), str(self.neurons)
        record["dense_layers"] = list(self.dense_layers)
        return record


DENSE = SparsitySettings(mode="dense")


def parse_layer_list(text: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        layers = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise EdgecmError(f"--dense-layers {text}: use a comma-separated list of layer numbers, e.g. 0,1,29") from None
    if layers[0] < 0:  # no layer has a negative number, so -1 would silently match none
        raise EdgecmError(f"--dense-layers {text}: layer {layers[0]} does not exist; layers are numbered from 0")
    return layers
