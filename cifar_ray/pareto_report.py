"""The report's section for a search of several objectives: every trial against each cost,
the Pareto front drawn, the pick marked with its constraints' lines; the front's hypervolume
as the trial-epochs went by; a table of the trials sortable by any objective."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from cifar_ray.files import save_figure
from cifar_ray.names import shown_name
from cifar_ray.search.objectives import OBJECTIVES, front, parse_pick
from cifar_ray.search.settings import format_value

# Clicking a header sorts the table by that column (numbers as numbers), again: the other way.
SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click",
  () => { const body = th.closest("table").tBodies[0];
    const up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
    const key = r => { const t = r.cells[col].dataset.value ?? r.cells[col].textContent;
                       const n = parseFloat(t); return isNaN(n) ? t : n; };
    [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); }).forEach(r => body.appendChild(r));
  }));
</script>"""


def measured_again(pick: dict[str, Any]) -> tuple[str, str]:
    """results.json's pick in words: the retrained export's values, and each constraint met
    or not (the report's, the console's and summary.md's)."""
    again = ", ".join(f"{n} {format_value(v)}" for n, v in pick["retrained"].items())
    meets = "; ".join(f"{c}: {'met' if ok else 'NOT met'}" for c, ok in pick["meets"].items())
    return again, meets


def plot_front(rows: list[dict[str, Any]], objectives: list[str], pick: dict[str, Any],
               target: Path) -> None:
    """A panel per cost: every trial's score against it, the front's steps, the pick, and
    each constraint of the pick on that axis as a dashed line."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from cifar_ray.plots import plt  # configured there

    score, costs = objectives[0], objectives[1:]
    on_front = {r["trial_id"] for r in front(rows, objectives)}
    fig, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 5.8), layout="constrained",
                             squeeze=False)
    for ax, cost in zip(axes[0], costs):
        pairs = [(r[cost], r[score], r["trial_id"]) for r in rows
                 if isinstance(r.get(cost), (int, float)) and isinstance(r.get(score), (int, float))]
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], color="lightgrey",
                   edgecolor="grey", label="a trial", zorder=2)
        steps = sorted(front([{"trial_id": t, cost: c, score: s} for c, s, t in pairs],
                             [score, cost]), key=lambda r: r[cost])
        ax.step([r[cost] for r in steps], [r[score] for r in steps], where="post",
                color="tab:blue", label=f"front ({score} vs {cost})", zorder=3)
        marked = [p for p in pairs if p[2] in on_front]
        ax.scatter([p[0] for p in marked], [p[1] for p in marked], color="tab:blue", zorder=4,
                   label="on the front of all objectives")
        chosen = [p for p in pairs if p[2] == pick["trial"]]
        ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], marker="*", s=300,
                   color="tab:red", zorder=5, label=f"the pick: {shown_name(pick['trial'])}")
        for constraint in parse_pick(", ".join(pick["constraints"]), objectives):
            if constraint.name in (cost, score):
                line = ax.axvline if constraint.name == cost else ax.axhline
                line(constraint.bound, color="tab:red", linestyle="--", label=constraint.text())
        if _spread(pairs) > 4:  # plain numbers on the ticks (no math text: plots.py)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{cost} ({OBJECTIVES[cost][1].split(':')[0]}): lower is better")
        ax.set_ylabel(f"{score}: higher is better")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle(f"{len(rows)} trials: {score} against what each model costs")
    save_figure(fig, target, dpi=100)


def _spread(pairs: list[tuple]) -> float:
    values = [p[0] for p in pairs if p[0] > 0]
    return max(values) / min(values) if values else 1.0


def plot_hypervolume(history: list[tuple[int, float]], target: Path) -> None:
    from cifar_ray.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.step([h[0] for h in history], [h[1] for h in history], where="post", color="tab:blue")
    ax.set_xlabel("trial-epochs (every epoch any trial trained, in the order reported)")
    ax.set_ylabel("hypervolume (share of the box)")
    ax.set_title("The front's hypervolume as the search went on")
    ax.grid(alpha=0.3)
    save_figure(fig, target, dpi=100)


def sortable_table(rows: list[dict[str, Any]], keys: list[str], objectives: list[str],
                   best_id: str, on_front: set[str]) -> str:
    """Every trial with its searched values and objectives; click a header to sort by it."""
    headers = ["trial", "front", *keys, *objectives, "epochs", "status"]
    head = "".join(f"<th title='click to sort'>{html.escape(shown_name(h))} &#8597;</th>"
                   for h in headers)
    body = []
    for r in rows:
        cells = [r["trial_id"], "yes" if r["trial_id"] in on_front else "",
                 *(r.get(k) for k in keys), *(r.get(n) for n in objectives), r["epochs"],
                 r["status"]]
        tds = "".join(
            f"<td data-value='{html.escape(repr(c) if isinstance(c, (int, float)) else '')}'>"
            f"{html.escape('' if c is None else format_value(c) if not isinstance(c, str) else shown_name(c))}</td>"
            for c in cells)
        body.append(f"<tr{' class=best' if r['trial_id'] == best_id else ''}>{tds}</tr>")
    return (f"<table class=sortable><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def pareto_section(folder: Path, link: str, results: dict[str, Any], rows: list[dict[str, Any]],
                   keys: list[str]) -> str:
    """The section's HTML (empty for a search of one objective); draws its figures."""
    objectives = results.get("objectives")
    if not objectives:
        return ""
    pick = results["pick"]
    plot_front(rows, objectives, pick, folder / "pareto.png")
    history = results.get("hypervolume_history") or []
    plot_hypervolume(history, folder / "hypervolume.png")
    again, meets = measured_again(pick)
    constraints = ", ".join(pick["constraints"]) or "none: the most accurate of the front"
    return f"""<h2>Objectives: {html.escape(', '.join(objectives))}</h2>
<p>{len(results['front'])} of {len(rows)} trials are on the Pareto front (no other trial is as
good in every objective and better in one). Pick: {html.escape(constraints)}; trial
{html.escape(shown_name(pick['trial']))} was retrained, its export measured again: {html.escape(again)}
{('(' + html.escape(meets) + ')') if meets else ''}. Hypervolume of the front:
{format_value(results.get('hypervolume') or 0.0)}.</p>
<figure><img src="{link}/pareto.png" alt="Pareto front"><figcaption>Every trial's
{html.escape(objectives[0])} against each cost; blue: the front; red star: the pick; dashed:
its constraints</figcaption></figure>
<figure><img src="{link}/hypervolume.png" alt="hypervolume"><figcaption>The hypervolume of the
trials so far, after each trial-epoch</figcaption></figure>
<h3>Every trial, by objective (click a header to sort)</h3>
{sortable_table(rows, keys, objectives, results['best_trial'],
                {f['trial'] for f in results['front']})}
{SORT_SCRIPT}"""
