"""``lorakit sweep``: which weights to adapt and with which rank (paper Tables 5 and 6).

Placements are written with the paper's letters: ``q``, ``k``, ``v``, ``o`` (the attention
projections) and their combinations (``qv``, ``qkvo``). With ``--budget N`` every placement
gets rank ``N / (number of weight types)``, so all train the same number of parameters
(Table 5: ``r = 8`` for one type, 4 for two, 2 for four). With ``--ranks`` every placement
is trained at every rank (Table 6). Each run is an ordinary ``lorakit train`` run in
``<out>/<placement>-r<rank>/``; the table goes to ``sweep.json`` and ``sweep.png``.
With ``--resume`` an interrupted sweep continues: finished runs are read back from their
last checkpoint, the interrupted one continues from its own, the rest start fresh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import data
from .tasks.glue import load_classifier
from .train import TrainConfig, train_seeds

__all__ = ["projection_names", "plan", "sweep"]

# The four attention projections, by naming scheme: BERT/RoBERTa, MPNet.
_SCHEMES = ({"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"},
            {"q": "q", "k": "k", "v": "v", "o": "o"})


def projection_names(model_name: str, task: str = "mrpc") -> dict[str, str]:
    """The module names of the model's q, k, v, o projections."""
    _, model = load_classifier(model_name, data.get_task(task))
    names = [n for n, _ in model.named_modules()]
    for scheme in _SCHEMES:
        if all(any(n == p or n.endswith("." + p) for n in names) for p in scheme.values()):
            return scheme
    raise ValueError(f"cannot find q/k/v/o projections in {model_name!r} (known schemes: {list(_SCHEMES)})")


def plan(placements: list[str], budget: int | None, ranks: list[int] | None) -> list[tuple[str, int]]:
    """(placement, rank) pairs to train."""
    if (budget is None) == (ranks is None):
        raise ValueError("give exactly one of --budget (Table 5) and --ranks (Table 6)")
    for p in placements:
        if not p or set(p) - set("qkvo") or len(set(p)) != len(p):
            raise ValueError(f"placement {p!r}: use the letters q, k, v, o, each at most once (e.g. qv)")
    if ranks is not None:
        return [(p, r) for p in placements for r in ranks]
    pairs = []
    for p in placements:
        if budget % len(p):
            raise ValueError(f"--budget {budget} does not divide among the {len(p)} weight types of {p!r}")
        pairs.append((p, budget // len(p)))
    return pairs


def sweep(cfg: TrainConfig, placements: list[str], budget: int | None = None, ranks: list[int] | None = None) -> dict:
    """Train every (placement, rank) of the plan with ``cfg``'s recipe; returns the table."""
    pairs = plan(placements, budget, ranks)
    names = projection_names(cfg.model, cfg.task)
    task = data.get_task(cfg.task)
    rows: list[dict[str, Any]] = []
    for placement, r in pairs:
        run_cfg = dataclasses.replace(cfg, method="lora", lora_r=r,
                                      target_modules=",".join(names[c] for c in placement),
                                      out=str(Path(cfg.run_dir) / f"{placement}-r{r}"))
        print(f"\n== {placement} (r={r}): {run_cfg.target_modules}", flush=True)
        report = train_seeds(run_cfg)
        rows.append({"placement": placement, "r": r, "targets": run_cfg.target_modules, "median": report["median"],
                     "per_seed": report["per_seed"], "trainable_params": report["trainable_params"]})
    table = {"task": task.name, "model": cfg.model, "seeds": list(cfg.seeds), "epochs": cfg.epochs,
             "budget": budget, "rows": rows}
    out = Path(cfg.run_dir)
    (out / "sweep.json").write_text(json.dumps(table, indent=2) + "\n")
    _plot(table, task, out / "sweep.png")
    return table


def _plot(table: dict, task: data.Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(iter(table["rows"][0]["median"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    placements = list(dict.fromkeys(row["placement"] for row in table["rows"]))

    def seeds(row: dict) -> list[float]:
        return [100 * m[metric] for m in row["per_seed"].values()]

    if table["budget"] is not None:  # one bar per placement (the median), a dot per seed
        labels = [f"{row['placement']} (r={row['r']})" for row in table["rows"]]
        ax.bar(labels, [100 * row["median"][metric] for row in table["rows"]], color="tab:blue", label="median")
        for i, row in enumerate(table["rows"]):
            ax.plot([i] * len(row["per_seed"]), seeds(row), "k.", label="seeds" if i == 0 else None)
        values = [v for row in table["rows"] for v in seeds(row)]
        ax.set_ylim(min(values) - 2, max(values) + 1)
        ax.legend(fontsize=8)
    else:  # one line per placement over the ranks (the median), a dot per seed
        for p in placements:
            rows = [row for row in table["rows"] if row["placement"] == p]
            line, = ax.plot([row["r"] for row in rows], [100 * row["median"][metric] for row in rows], "o-", label=p)
            for row in rows:
                ax.plot([row["r"]] * len(row["per_seed"]), seeds(row), ".", color=line.get_color(), alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.legend(fontsize=8)
    ax.set_ylabel(f"dev {metric} (%)")
    ax.set_title(f"{table['model']} {task.name}: median of {len(table['seeds'])} seed(s), {table['epochs']} epochs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
