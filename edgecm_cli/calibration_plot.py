"""``edgecm calibrate --plot``: what every token-pruning candidate kept of the answers, against what it cost."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"core": "tab:blue", "core-ref": "tab:orange", "fastv": "tab:green", "sparsevlm": "tab:purple",
           "random": "tab:gray"}


def draw(results: list, chosen, target: float, out: Path, model: str) -> Path:
    """Two panels: agreement against relative prefill cost for every candidate (one colour per ranking, the
    chosen one and dense marked), and agreement against K for each ranking at the chosen budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost, depth) = plt.subplots(1, 2, figsize=(13, 5.2))
    for rank, colour in COLOURS.items():
        mine = [r for r in results if r.candidate.rank == rank]
        if mine:
            cost.scatter([r.relative_prefill_flops for r in mine], [r.top1_agreement for r in mine], s=18,
                         color=colour, alpha=0.75, label=rank + (" (reference)" if rank == "random" else ""))
    cost.scatter([1.0], [1.0], marker="D", s=60, color="black", label="dense", zorder=3)
    if chosen is not None:
        cost.scatter([chosen.relative_prefill_flops], [chosen.top1_agreement], marker="*", s=320,
                     facecolor="none", edgecolor="red", linewidth=1.8, label=f"chosen: {chosen.candidate.label}",
                     zorder=4)
    cost.axhline(target, color="red", linestyle=":", linewidth=1, label=f"target {target:g}")
    cost.set_xlabel("prefill FLOPs relative to dense (vision tower included)")
    cost.set_ylabel("teacher-forced top-1 agreement with dense")
    cost.set_title("every candidate: ranking x prune layer K x budget")
    cost.legend(fontsize=8, loc="lower right")
    cost.grid(alpha=0.3)

    budget = chosen.candidate.tokens if chosen is not None else None
    for rank, colour in COLOURS.items():
        mine = [r for r in results if r.candidate.rank == rank and
                (budget is None and r.candidate.tokens.kind == "ratio" and r.candidate.tokens.value == 0.25
                 or budget is not None and r.candidate.tokens == budget)]
        if mine:
            mine.sort(key=lambda r: r.candidate.k)
            depth.plot([r.candidate.k for r in mine], [r.top1_agreement for r in mine], marker="o", color=colour,
                       label=rank)
    if chosen is not None:
        depth.scatter([chosen.candidate.k], [chosen.top1_agreement], marker="*", s=320, facecolor="none",
                      edgecolor="red", linewidth=1.8, zorder=4)
    depth.axhline(target, color="red", linestyle=":", linewidth=1)
    shown = "adaptive (knee / rank rule)" if budget is not None and budget.kind == "knee" else str(budget or "ratio:0.25")
    depth.set_xlabel("prune layer K (layers 0..K-1 see every image token)")
    depth.set_ylabel("teacher-forced top-1 agreement with dense")
    depth.set_title(f"agreement against K at budget {shown}")
    depth.legend(fontsize=8, loc="lower right")
    depth.grid(alpha=0.3)
    fig.suptitle(f"edgecm calibrate on {model}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
