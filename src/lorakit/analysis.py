"""The paper's analyses of the low-rank update (section 7): subspace similarity between
adapters (Figures 3-4) and how ΔW amplifies directions of W (Table 7).

- Subspace similarity of two adapters' ``A`` factors (shapes ``(r1, d)``, ``(r2, d)``):
  with ``U_1``, ``U_2`` the right-singular vectors of each (``d x r``, ordered by singular
  value), ``phi(i, j) = ||U_1[:, :i]^T U_2[:, :j]||_F^2 / min(i, j)`` in [0, 1]: 1 when the
  top-i directions of one lie in the span of the top-j of the other, 0 when orthogonal.
- Amplification: with ``U, V`` the top-r left/right singular vectors of ``ΔW``,
  ``||U^T W V||_F`` measures how much of ``W`` lies in ΔW's directions; compared with the
  same for ``W``'s own top-r directions and for random ones. The amplification factor
  is ``||ΔW||_F / ||U^T W V||_F``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import LoraConfig
from .io import PREFIX, read_weights

__all__ = ["right_singular_vectors", "subspace_similarity", "projection_norms", "adapter_factors", "similarity_report",
           "amplification_report"]


def right_singular_vectors(a: Tensor) -> Tensor:
    """``(d, r)``: the right-singular vectors of ``a`` (``(r, d)``), largest singular value first."""
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh.T


def subspace_similarity(a1: Tensor, a2: Tensor) -> Tensor:
    """``phi[i-1, j-1] = phi(a1, a2, i, j)`` for every ``i <= r1``, ``j <= r2`` (paper eq. 4)."""
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"the factors act on different spaces: {tuple(a1.shape)} vs {tuple(a2.shape)}")
    overlap = (right_singular_vectors(a1).T @ right_singular_vectors(a2)).square()  # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)  # ||U1[:, :i]^T U2[:, :j]||_F^2
    i = torch.arange(1, a1.shape[0] + 1, dtype=cumulative.dtype)
    j = torch.arange(1, a2.shape[0] + 1, dtype=cumulative.dtype)
    return cumulative / torch.minimum(i[:, None], j[None, :])


def projection_norms(weight: Tensor, delta: Tensor, r: int, seed: int = 0) -> dict[str, float]:
    """Table 7 for one matrix: ``||U^T W V||_F`` with ``U, V`` the top-``r`` singular vectors
    of ΔW, of W, and random orthonormal ones; ``||W||_F``, ``||ΔW||_F`` and the amplification
    factor ``||ΔW||_F / ||U^T W V||_F`` (ΔW's directions)."""
    w, dw = weight.double(), delta.double()
    if w.shape != dw.shape:
        raise ValueError(f"W {tuple(w.shape)} and ΔW {tuple(dw.shape)} differ in shape")
    u_d, _, vh_d = torch.linalg.svd(dw, full_matrices=False)
    u_w, _, vh_w = torch.linalg.svd(w, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    u_r = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=w.dtype)).Q
    v_r = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=w.dtype)).Q

    def projected(u: Tensor, v: Tensor) -> float:
        return torch.linalg.matrix_norm(u.T @ w @ v).item()

    along_delta = projected(u_d[:, :r], vh_d[:r].T)
    delta_norm = torch.linalg.matrix_norm(dw).item()
    return {"delta_directions": along_delta, "w_directions": projected(u_w[:, :r], vh_w[:r].T),
            "random_directions": projected(u_r, v_r), "w_norm": torch.linalg.matrix_norm(w).item(),
            "delta_norm": delta_norm, "amplification": delta_norm / along_delta}


def adapter_factors(directory: str | Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module path: (A, B, scaling)}`` of a LoRA adapter folder (PEFT format), read from
    the file alone (no model)."""
    config = LoraConfig.load(directory)
    tensors = read_weights(directory)
    out = {}
    for key, a in tensors.items():
        for suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(suffix):
                path = key.removeprefix(PREFIX).removesuffix(suffix)
                out[path] = (a.float(), tensors[key.removesuffix(suffix) + b_suffix].float(), config.scaling)
    if not out:
        raise ValueError(f"no LoRA factors in {str(directory)!r}")
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


# ---- reports (JSON + PNG) ----------------------------------------------------------------


def similarity_report(first: str | Path, second: str | Path, out: str | Path,
                      labels: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """phi for every module the two adapters share: ``similarity.json`` and a heat-map grid
    ``similarity.png`` (rows i of the first adapter, columns j of the second)."""
    f1, f2 = adapter_factors(first), adapter_factors(second)
    shared = [m for m in f1 if m in f2]
    if not shared:
        raise ValueError(f"{first!s} and {second!s} adapt no module in common")
    grids = {m: subspace_similarity(f1[m][0], f2[m][0]) for m in shared}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"first": str(first), "second": str(second), "modules": {
        m: {"phi": g.tolist(), "phi_top1": g[0, 0].item(), "mean_phi_diagonal": g.diagonal().mean().item()}
        for m, g in grids.items()}}
    (out / "similarity.json").write_text(json.dumps(report, indent=1) + "\n")
    _heatmaps(grids, out / "similarity.png", *labels)
    return report


def _heatmaps(grids: dict[str, Tensor], path: Path, first: str, second: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for k, (ax, (name, grid)) in enumerate(zip(axes.flat, grids.items())):
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(".".join(name.split(".")[-4:]), fontsize=7)
        ax.set_xlabel(f"j ({second})", fontsize=7)
        if k % cols == 0:
            ax.set_ylabel(f"i ({first})", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="phi(i, j)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def amplification_report(adapter: str | Path, weights: dict[str, Tensor], out: str | Path) -> dict[str, Any]:
    """Table 7 for every adapted module, with r the adapter's rank: ``weights`` maps module
    path -> the base weight ``W`` (``(out, in)``). Written to ``amplification.json``."""
    rows = {}
    for path, (a, b, scaling) in adapter_factors(adapter).items():
        if path not in weights:
            raise ValueError(f"no base weight for {path!r}")
        w = weights[path]
        delta = (b @ a) * scaling
        if delta.shape != w.shape:
            delta = delta.T  # Conv1D-style (in, out) weights
        rows[path] = {"r": a.shape[0], **projection_norms(w, delta, a.shape[0])}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"adapter": str(adapter), "modules": rows}
    (out / "amplification.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
