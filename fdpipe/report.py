"""Aggregation of per-space evaluations into FDr^k tables and figures."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from fdpipe.evaluate import fdrk, read_json
from fdpipe.store import atomic_path

log = logging.getLogger(__name__)


def collect(eval_files: list[str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """Read results/eval/{variant}/{space}.json files into {variant: {space: result}}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for path in eval_files:
        path = Path(path)
        variant = path.parent.name
        result = read_json(path)
        table.setdefault(variant, {})[result["space"]] = result
    return table


def build_rows(table: dict[str, dict[str, dict[str, Any]]], spaces: list[str],
               fdrk_spaces: list[str], variants: dict[str, dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    rows = []
    for variant, results in table.items():
        row: dict[str, Any] = {"variant": variant}
        row.update((variants or {}).get(variant, {}))
        row["n"] = min(r["n"] for r in results.values())
        row["fdr_k"] = fdrk({s: r["fdr"] for s, r in results.items()}, fdrk_spaces)
        for space in spaces:
            row[f"fd_{space}"] = results[space]["fd"]
            row[f"fdr_{space}"] = results[space]["fdr"]
        scores = [r["inception_score"] for r in results.values() if "inception_score" in r]
        if scores:
            row["inception_score"] = scores[0]
        rows.append(row)
    rows.sort(key=lambda r: r["fdr_k"])
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: list[str], caption: str) -> str:
    out = [caption, "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row[c]) if isinstance(row.get(c), (list, tuple)) else
                         row.get(c, "") for c in columns})
    return buffer.getvalue()


def plot_fdrk(rows: list[dict[str, Any]], spaces: list[str], path: str | Path) -> None:
    """Bar chart of FDr per space and FDr^k for every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = [r["variant"] for r in rows]
    series = spaces + ["fdr_k"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(variants) + 2), 4))
    x = np.arange(len(variants))
    for i, name in enumerate(series):
        key = name if name == "fdr_k" else f"fdr_{name}"
        ax.bar(x + i * width, [r[key] for r in rows], width,
               label="FDr^k" if name == "fdr_k" else name,
               hatch="//" if name == "fdr_k" else None)
    ax.set_xticks(x + 0.4 - width / 2, variants, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("FDr (FD / validation FD), log scale")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("FDr per space and FDr^k (lower is better; 1 = validation images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


def aggregate(eval_files: list[str | Path], spaces: list[str], fdrk_spaces: list[str],
              out_csv: str | Path, out_md: str | Path, out_figure: str | Path | None = None,
              variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write the FDr^k table (CSV and Markdown, sorted by FDr^k) and its figure."""
    rows = build_rows(collect(eval_files), spaces, fdrk_spaces, variants)
    meta = sorted({k for r in rows for k in (variants or {}).get(r["variant"], {})})
    columns = ["variant", *meta, "n", "fdr_k"]
    if any("inception_score" in r for r in rows):
        columns.append("inception_score")
    columns += [f"fd_{s}" for s in spaces] + [f"fdr_{s}" for s in spaces]
    caption = (f"FDr^k = mean over {{{', '.join(fdrk_spaces)}}} of FD / validation FD; "
               f"n = generated images per FD; sorted by FDr^k (lower is better).")
    with atomic_path(out_csv) as tmp:
        tmp.write_text(to_csv(rows, columns))
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(rows, columns, caption))
    if out_figure is not None:
        plot_fdrk(rows, fdrk_spaces, out_figure)
    log.info("wrote the FDr^k table of %d variants to %s", len(rows), out_md)
    return rows


def experiment_table(name: str, varied: str, rows_spec: dict[str, Any], fixed: dict[str, Any],
                     eval_files: list[str | Path], spaces: list[str], fdrk_spaces: list[str],
                     out_csv: str | Path, out_md: str | Path,
                     out_figure: str | Path | None = None,
                     costs: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Write the table of one experiment set, rows in the set's order."""
    table = collect(eval_files)
    built = {r["variant"]: r for r in build_rows(table, spaces, fdrk_spaces)}
    rows = []
    for variant, value in rows_spec.items():
        row = {"variant": variant, varied: value, **built[variant]}
        if costs is not None:
            row["nfe_per_image"] = costs[variant]
        rows.append(row)
    columns = ["variant", varied] + (["nfe_per_image"] if costs is not None else [])
    columns += ["n", "fdr_k"] + [f"fd_{s}" for s in spaces]
    fixed_text = ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(fixed.items())
                           if k not in ("weights",)) or "-"
    caption = (f"Experiment '{name}': varied {varied}; fixed {fixed_text}. FDr^k = mean over "
               f"{{{', '.join(fdrk_spaces)}}} of FD / validation FD (lower is better); "
               f"n = generated images per FD.")
    with atomic_path(out_csv) as tmp:
        tmp.write_text(to_csv(rows, columns))
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(rows, columns, caption))
    if out_figure is not None:
        plot_experiment(rows, varied, fdrk_spaces, name, out_figure)
    log.info("wrote the '%s' table of %d rows to %s", name, len(rows), out_md)
    return rows


def plot_experiment(rows: list[dict[str, Any]], varied: str, spaces: list[str], name: str,
                    path: str | Path) -> None:
    """FDr per space and FDr^k for each row of an experiment set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_fmt(r[varied]) if r["variant"].startswith(("queue-", "beta-")) else r["variant"]
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    x = list(range(len(rows)))
    for space in spaces:
        ax.plot(x, [r[f"fdr_{space}"] for r in rows], marker="o", lw=1, label=space)
    ax.plot(x, [r["fdr_k"] for r in rows], marker="s", lw=2.5, color="black", label="FDr^k")
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_xlabel(varied)
    ax.set_yscale("log")
    ax.set_ylabel("FDr (log scale, lower is better)")
    ax.set_title(f"Experiment '{name}'")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def rank_agreement(eval_files: list[str | Path], spaces: list[str], fdrk_spaces: list[str],
                   out_csv: str | Path, out_md: str | Path) -> dict[str, dict[str, float]]:
    """Kendall tau between the rankings of runs by FD in each pair of evaluation spaces.

    A low or negative tau between two spaces means they order the same models
    differently, so a single space (such as FID) can misrank them.
    """
    from scipy.stats import kendalltau

    rows = build_rows(collect(eval_files), spaces, fdrk_spaces)
    if len(rows) < 2:
        raise ValueError(f"rank agreement needs at least 2 runs, got {len(rows)}")
    scores = {s: [r[f"fd_{s}"] for r in rows] for s in spaces}
    scores["FDr^k"] = [r["fdr_k"] for r in rows]
    names = list(scores)
    matrix = {a: {b: float(kendalltau(scores[a], scores[b]).statistic) for b in names}
              for a in names}
    table = [{"space": a, **{b: matrix[a][b] for b in names}} for a in names]
    caption = (f"Kendall tau between the rankings of {len(rows)} runs "
               f"({', '.join(r['variant'] for r in rows)}) by FD in each evaluation space "
               f"(1 = same order, -1 = reversed).")
    with atomic_path(out_csv) as tmp:
        tmp.write_text(to_csv(table, ["space", *names]))
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table, ["space", *names], caption))
    return matrix
