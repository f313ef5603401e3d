"""A search of several objectives after its trials: the picked trial's retrained model
exported and measured again, and what results.json, the console and summary.md say of the
front, its hypervolume and the pick (the report draws them: pareto_report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_ray.config import flat, overlay
from cifar_ray.names import shown_name
from cifar_ray.pareto_report import measured_again
from cifar_ray.search.objectives import (
    FOOTPRINT,
    LATENCY,
    front,
    hypervolume_history,
    read_latency_table,
)
from cifar_ray.search.settings import SearchConfig, format_value


def measure_export(cfg: SearchConfig, checkpoint: str, out: Path,
                   best_config: dict[str, Any]) -> dict[str, Any] | None:
    """With several objectives: the retrained model exported to ONNX (retrain/model.onnx) and
    what it costs measured again, as the trials measured theirs (footprint.measure)."""
    objectives = cfg.objectives()
    if len(objectives) == 1:
        return None
    from cifar_ray import export, footprint
    from cifar_ray.module import load_module

    latency = set(LATENCY) & set(objectives)
    onnx = export.export(checkpoint, "onnx", out / "retrain" / "model.onnx") if latency else None
    table = cfg.tune.latency_table
    found = footprint.measure(load_module(checkpoint),
                              cfg.tune.latency_batch if latency and not table else None,
                              onnx=onnx.read_bytes() if onnx else None)
    if table:  # the device's own figures for the retrained shape
        found.update(read_latency_table(table).lookup(flat(overlay(cfg, best_config))) or {})
    return {**{name: found[name] for name in objectives if name in FOOTPRINT},
            "onnx": str(onnx) if onnx else None}


def pareto_results(cfg: SearchConfig, rows: list[dict[str, Any]], best: dict[str, Any],
                   measured: dict[str, Any] | None) -> dict[str, Any]:
    """With several objectives, results.json's: the objectives, the front (each trial's
    sample and objectives), its hypervolume, and the pick: the constraints, the trial's
    values, the retrained export's measured again and whether they still meet them."""
    objectives = cfg.objectives()
    if len(objectives) == 1:
        return {}
    history = hypervolume_history(rows, objectives)
    constraints = cfg.constraints()
    again = {k: v for k, v in (measured or {}).items() if k in FOOTPRINT}
    return {
        "objectives": objectives,
        "front": [{"trial": r["trial_id"], "config": r["config"],
                   **{n: r.get(n) for n in objectives}} for r in front(rows, objectives)],
        "hypervolume": history[-1][1] if history else None,
        "hypervolume_history": history,
        # Enough to draw another front or hypervolume from (the benchmark compares searches).
        "trials": [{"trial": r["trial_id"], "epochs": r["epochs"], "curve": r["curve"],
                    "curve_at": r["curve_at"], **{n: r.get(n) for n in objectives}}
                   for r in rows],
        "pick": {"constraints": [c.text() for c in constraints], "trial": best["trial_id"],
                 "searched": {n: best.get(n) for n in objectives},
                 "retrained": again, "onnx": (measured or {}).get("onnx"),
                 "meets": {c.text(): c.holds(again.get(c.name, best.get(c.name)))
                           for c in constraints}},
    }


def pick_line(pick: dict[str, Any]) -> str:
    """The pick's constraints against the retrained export's measured values."""
    again, meets = measured_again(pick)
    return (f"  pick:    trial {shown_name(pick['trial'])}; the retrained model measured again: "
            f"{again}"
            + (f"; {meets}" if meets else ""))


def pareto_lines(results: dict[str, Any]) -> str:
    if not results.get("objectives"):
        return ""
    pick = results["pick"]
    return (f"\n- objectives: {', '.join(results['objectives'])}; {len(results['front'])} trials "
            f"on the Pareto front, hypervolume {format_value(results['hypervolume'] or 0.0)}"
            f"\n- {pick_line(pick).strip()}")
