"""One page for a whole search: `report.html` in its output dir, its figures in `report/`
(works offline, from disk): the outcome, every trial's curve with ASHA's rungs, the searched
keys against the score the search went by (tune.metric; Optuna's visualisations), the trials, the retrain, GradCAM."""

from __future__ import annotations

import html
import math
import shlex
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cifar_ray.console import format_duration
from cifar_ray.files import save_figure, write_text
from cifar_ray.names import GRADCAM_FIGURES, METRIC, METRICS, shown_name
from cifar_ray.pareto_report import pareto_section
from cifar_ray.search.settings import format_value, optuna_distribution

FOLDER = "report"
# The evaluator of hyperparameter importance, and how the page names it.
IMPORTANCE = ("fANOVA (Optuna's FanovaImportanceEvaluator: the share of the accuracy's "
              "variance each key explains, from a random forest fitted to the trials)")


def plot_trial_curves(rows: list[dict[str, Any]], best_id: str, rungs: list[int],
                      target: Path, metric: str = METRIC) -> None:
    from cifar_ray.plots import plt  # configured there
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    for rung in rungs:
        ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    stopped_label = "stopped by ASHA"
    for row in sorted(rows, key=lambda r: r["trial_id"] == best_id):  # the best drawn last
        if not row["curve"]:
            continue
        epochs, accs = zip(*row["curve"])
        best = row["trial_id"] == best_id
        ax.plot(epochs, accs, marker="o", markersize=3, linewidth=2.5 if best else 1,
                alpha=1 if best else 0.6, color="tab:red" if best else None, zorder=3 if best else 2,
                label=f"best: {row['trial_id']}" if best else None)
        if row["status"] == "stopped early":
            ax.plot(epochs[-1], accs[-1], "kx", markersize=8, label=stopped_label)
            stopped_label = None  # one legend entry
    if rungs:
        ax.plot([], [], color="grey", linestyle=":", label="ASHA rungs")
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRICS[metric])
    ax.set_title(f"{METRICS[metric].capitalize()} of the {len(rows)} trials")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not on them
    save_figure(fig, target, dpi=100)


def optuna_study(rows: list[dict[str, Any]], space: dict[str, tuple[str, list]]):
    """An in-memory Optuna study of the trials that scored, whichever searcher ran them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    distributions = {key: optuna_distribution(*spec) for key, spec in space.items()}
    for row in rows:
        if row["best_score"] is not None:
            study.add_trial(optuna.trial.create_trial(
                params={key: row[key] for key in space}, distributions=distributions,
                value=row["best_score"]))
    return study


MIN_IMPORTANCE_TRIALS = 10


def plot_search_space(study, keys: list[str], folder: Path,
                      metric: str = METRIC) -> dict[str, str]:
    """Optuna's figures of the searched keys against accuracy; {file name: why it is missing}
    for any that could not be drawn (too few trials, one key only)."""
    from cifar_ray.plots import plt  # configured there
    import optuna
    from optuna.visualization import matplotlib as vis

    missing = {}
    value = METRICS[metric]
    figures = {
        "parallel_coordinates.png": lambda: vis.plot_parallel_coordinate(study, target_name=value),
        "slices.png": lambda: vis.plot_slice(study, target_name=value),
        "importance.png": lambda: vis.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target_name=value),
    }
    sizes = {"parallel_coordinates.png": (2.2 * len(keys) + 4, 5.5),  # inches, by key count
             "slices.png": (4.5 * len(keys), 4.5), "importance.png": (9, 1.2 * len(keys) + 2)}
    scored = len(study.trials)
    for name, draw in figures.items():
        if scored < 2:
            missing[name] = f"needs at least 2 scored trials ({scored} here)"
            continue
        if name == "importance.png" and scored < MIN_IMPORTANCE_TRIALS:
            missing[name] = (f"left out below {MIN_IMPORTANCE_TRIALS} scored trials ({scored} "
                             "here): from so few, fANOVA's importances are noise")
            continue
        if name == "parallel_coordinates.png" and len(keys) < 2:
            missing[name] = "needs at least 2 searched keys"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
            try:
                axes = draw()
            except (ValueError, RuntimeError) as exc:
                missing[name] = f"not computed: {exc}"
                plt.close("all")
                continue
        fig = np.atleast_1d(axes).flat[0].figure  # one Axes, or an array of them
        fig.set_size_inches(*sizes[name])
        # bbox "tight": Optuna's axes labels (long config keys) reach past the figure's edge.
        save_figure(fig, folder / name, dpi=100, bbox_inches="tight")
    return missing


def _table(headers: list[str], rows: list[list[str]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=best' if i == highlight else ''}>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _cell(value: Any) -> str:
    return "" if value is None else format_value(value)


def write_report(out: Path, results: dict[str, Any], rows: list[dict[str, Any]],
                 space: dict[str, tuple[str, list]], rungs: list[int],
                 gradcam_summary: dict[str, Any]) -> Path:
    """Draws the figures and writes `out/report.html`; returns its path."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(space)
    best_id = results["best_trial"]
    metric = results.get("metric", METRIC)
    what = METRICS[metric]
    plot_trial_curves(rows, best_id, rungs, folder / "curves.png", metric)
    missing = plot_search_space(optuna_study(rows, space), keys, folder, metric)

    def figure(name: str, caption: str) -> str:
        if name in missing:
            return f"<p class=note>{html.escape(caption)}: {html.escape(missing[name])}.</p>"
        return _figure(f"{FOLDER}/{name}", caption)

    gradcam_link, gradcam = gradcam_section(out, gradcam_summary)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cifar_ray search report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}img{{max-width:100%}}
figure{{margin:1.5em 0}}td,th{{padding:2px 10px;text-align:left}}tr.best{{background:#fde2e1}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}.note{{color:#666}}</style>
</head><body>
<h1>Search report</h1>
<h2>Outcome</h2>
{outcome_table(results)}
<h3>The test set, class by class</h3>
{class_table(results)}
{pareto_section(folder, FOLDER, results, rows, keys)}
<h2>Trials</h2>
{_figure(f"{FOLDER}/curves.png", f"{what.capitalize()} of every trial against epoch; dotted: ASHA's rungs, x: where ASHA stopped a trial; red: the best trial")}
{figure("parallel_coordinates.png", f"Parallel coordinates: each line a trial, its searched values, coloured by its best {what}")}
{figure("slices.png", f"Each searched key against the best {what} of each trial (log axes for log-sampled keys)")}
{figure("importance.png", "Hyperparameter importance by " + IMPORTANCE)}
<h2>Trials table</h2>
{trials_table(rows, keys, best_id, results.get("metric", METRIC))}
<h2>The retrain</h2>
{_figure("retrain/curves.png", "The retrain's training loss and accuracy (trained on train + validation: no validation curves)")}
<h2>Mistakes of the retrained model (GradCAM)</h2>
<p>The full report: <a href="{gradcam_link}/index.html">{gradcam_link}/index.html</a>.</p>
{gradcam}
</body></html>
"""
    target = out / "report.html"
    write_text(target, page)
    return target


def outcome_table(results: dict[str, Any]) -> str:
    best, metric = results["best_config"], results.get("metric", METRIC)
    images = sum(c["support"] for c in (results.get("per_class") or {}).values())
    low, high = wilson(results["test_acc"], images)
    second = results.get("runner_up")
    margin = (f"; {results['best_score'] - second['best_score']:+.4f} over the runner-up, "
              f"trial {second['trial']}" if second else "; no runner-up")
    return _table(["", ""], [
        *([["config", f"{shown_name(results['config_file'])}: "
                      f"{results.get('purpose') or '(no comment)'}"]]
          if results.get("config_file") else []),
        ["best configuration", ", ".join(f"{k} = {format_value(v)}" for k, v in best.items())],
        ["best trial", f"{results['best_trial']}: {metric} {results['best_score']:.4f} (what "
                       f"the search went by){margin}"],
        ["test set", f"{images:,} images: accuracy {results['test_acc']:.4f}, 95% interval "
                     f"{low:.3f} to {high:.3f}"],
        ["test accuracy", f"{results['test_acc']:.4f} (balanced accuracy "
                          f"{results['test_balanced_acc']:.4f}, macro F1 {results['test_f1']:.4f}, "
                          f"loss {results['test_loss']:.4f}), after "
                          f"a retrain of {results['retrain_epochs']} epochs on train + "
                          f"validation (init: {results['retrain_init']})"],
        ["trials", f"{results['num_trials']} ({results['trials_stopped_early']} stopped early "
                   f"by ASHA), searcher: {results['search_alg']}"],
        ["times", f"search {results['search_seconds']:.0f} s (some trial training for "
                  f"{results['training_seconds']:.0f} s), total {results['total_seconds']:.0f} s"],
        *head_start_rows(results), *budget_rows(results),
        ["files", "results.json, summary.md, trials.csv, "
                  f"checkpoint {results['checkpoint']}"],
        ["next", next_commands(results["checkpoint"])],
    ])


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on n images (95% at z = 1.96)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def next_commands(checkpoint: str) -> str:
    """What to do with the model: classify, export, serve (the checkpoint's path quoted)."""
    ckpt = shlex.quote(shown_name(checkpoint, 500))
    return (f"python -m cifar_ray.predict --checkpoint {ckpt} IMAGE ... ; "
            f"python -m cifar_ray.export --checkpoint {ckpt} --format onnx ; "
            f"python -m cifar_ray.app --checkpoint {ckpt}")


def budget_rows(results: dict[str, Any]) -> list[list[str]]:
    """The budget: what it bought against the plan, and the time used against it."""
    b = results.get("budget")
    if not b:
        return []
    return [["budget", f"{format_duration(b['used_s'])} used of {format_duration(b['budget_s'])}"
                       f" ({b['used_s'] / b['budget_s']:.0%})"],
            ["it bought", f"{b['trials']} trials (planned about {b['planned_trials']}) of up to "
                          f"{b['epochs']} epochs, ASHA's first rung at {b['grace_period']}, "
                          f"{b['trials_stopped_by_budget']} stopped by the deadline; a "
                          f"{results['retrain_epochs']}-epoch retrain (planned "
                          f"{b['planned_retrain_epochs']}); a trial-epoch took "
                          f"{b['epoch_s_measured']:.1f} s (planned {b['epoch_s_planned']:.1f} s)"]]


def head_start_rows(results: dict[str, Any]) -> list[list[str]]:
    """Where the search started from: earlier runs' trials, --try, --more rounds."""
    seeded, rows = results.get("seeded") or {}, []
    if seeded.get("trials"):
        rows.append(["seeded", f"{seeded['trials']} earlier trials from "
                               f"{', '.join(seeded['from'])} (best {seeded['best_score']:.4f}); "
                               f"{seeded['skipped']} outside this search, not used"])
    if seeded.get("tries"):
        rows.append(["--try", "; ".join(seeded["tries"])])
    if results.get("rounds", 1) > 1:
        rows.append(["rounds", f"{results['rounds']}: the first and {results['rounds'] - 1} "
                               "added with --more"])
    return rows


def class_table(results: dict[str, Any]) -> str:
    """Each class's precision, recall, F1 and images in the test set."""
    per_class = results.get("per_class") or {}
    return _table(["class", "precision", "recall", "F1", "test images"],
                  [[shown_name(name), f"{c['precision']:.3f}", f"{c['recall']:.3f}",
                    f"{c['f1']:.3f}", str(c["support"])] for name, c in per_class.items()])


def trials_table(rows: list[dict[str, Any]], keys: list[str], best_id: str,
                 metric: str = METRIC) -> str:
    """Every trial, the best first, its row highlighted."""
    ranked = sorted(rows, key=lambda r: -1 if r["best_score"] is None else r["best_score"],
                    reverse=True)
    return _table(
        ["trial", *keys, "epochs", f"best {metric}", "status", "from", "start-up s"],
        [[r["trial_id"], *(_cell(r[k]) for k in keys), str(r["epochs"]),
          _cell(r["best_score"]), r["status"], origin(r), _cell(r["startup_s"])]
         for r in ranked],
        highlight=next((i for i, r in enumerate(ranked) if r["trial_id"] == best_id), None))


def origin(row: dict[str, Any]) -> str:
    """'--try', 'earlier best' (a seeded run's), 'searcher', with the --more round if any."""
    where = f", more-{row['round']}" if row.get("round") else ""
    return row.get("origin", "searcher") + where


def gradcam_section(out: Path, gradcam_summary: dict[str, Any]) -> tuple[str, str]:
    """(The GradCAM report's folder as a link from the page, escaped; its figures)."""
    folder = Path(gradcam_summary["output_dir"])
    link = Path(folder.relative_to(out) if folder.is_relative_to(out) else folder)
    figures = "".join(_figure(f"{link.as_posix()}/{name}", GRADCAM_FIGURES[name])
                      for name in gradcam_summary["figures"])
    return html.escape(link.as_posix()), figures
