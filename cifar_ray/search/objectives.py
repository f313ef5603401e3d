"""A search's objectives (tune.objectives: a validation score to maximise, and what the model
costs where it will run, to minimise), the pick's constraints (tune.pick), the Pareto front,
its hypervolume, and multi-objective ASHA's rungs (Schmucker et al., "Multi-objective
Asynchronous Successive Halving", 2021): promotion by non-dominated sorting, ties within a
front broken by crowding distance. No Ray, no torch; moocore sorts and measures volumes."""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_ray.errors import ConfigError
from cifar_ray.files import read_inside
from cifar_ray.names import METRICS, shown_name

# What a trial can be judged by: name -> (direction, what it is). The footprint ones are what
# footprint.measure returns; a trial reports them with every epoch.
FOOTPRINT = {
    "latency_ms": "milliseconds per image at batch 1: the ONNX export under ONNX Runtime on "
                  "one CPU thread of the machine that trains it",
    "batch_latency_ms": "milliseconds per batch of tune.latency_batch images, likewise",
    "params": "parameters",
    "flops": "forward FLOPs per image (every test-time view)",
}
OBJECTIVES = {**{name: ("max", text) for name, text in METRICS.items()},
              **{name: ("min", text) for name, text in FOOTPRINT.items()}}
LATENCY = ("latency_ms", "batch_latency_ms")
# The config keys that change what a model costs (a search of costs must search one of them).
COST_KEYS = ("model.width", "model.res_blocks", "data.image_size", "eval.tta")
OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def parse_objectives(text: str, metric: str) -> list[str]:
    """`val/acc,latency_ms` -> ['val/acc', 'latency_ms']; empty: [metric]. Exactly one of the
    validation scores, each name once."""
    names = [n.strip() for n in str(text).split(",")] if str(text).strip() else [metric]
    for name in names:
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, list(OBJECTIVES), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"tune.objectives: unknown objective '{shown_name(name)}' (known: "
                              f"{', '.join(OBJECTIVES)}){hint}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tune.objectives: '{shown_name(text)}' names an objective twice")
    scores = [n for n in names if n in METRICS]
    if len(scores) != 1:
        raise ConfigError(f"tune.objectives: '{shown_name(text)}' needs exactly one validation score "
                          f"({', '.join(METRICS)}) beside what the model costs")
    return names


@dataclass(frozen=True)
class Constraint:
    name: str
    op: str
    bound: float

    def holds(self, value: float | None) -> bool:
        return value is not None and value == value and OPERATORS[self.op](value, self.bound)

    def excess(self, value: float | None) -> float:
        """How far `value` is past the bound, relative to it (0 when it holds)."""
        if self.holds(value):
            return 0.0
        if value is None or value != value:
            return math.inf
        return abs(value - self.bound) / max(abs(self.bound), 1e-12)

    def text(self) -> str:
        return f"{self.name} {self.op} {self.bound:.12g}"


def parse_pick(text: str, objectives: list[str]) -> list[Constraint]:
    """`latency_ms <= 2, params <= 1e6` -> its constraints, each on an objective measured."""
    constraints = []
    for part in filter(str.strip, str(text).split(",")):
        found = re.fullmatch(r"\s*([\w/]+)\s*(<=|>=|<|>)\s*(\S+)\s*", part)
        if not found:
            raise ConfigError(f"tune.pick: '{shown_name(part.strip())}' is not NAME OP NUMBER "
                              "(e.g. latency_ms <= 2, params <= 1e6)")
        name, op, number = found.groups()
        try:
            bound = float(number)
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise ConfigError(f"tune.pick: '{shown_name(part.strip())}': '{shown_name(number)}' is "
                              "not a finite number")
        if name not in objectives:
            why = ("is not an objective" if name not in OBJECTIVES else "is not measured")
            raise ConfigError(f"tune.pick: {shown_name(name)} {why}: the search measures "
                              f"{', '.join(objectives)} (add it with --objectives)")
        constraints.append(Constraint(name, op, bound))
    return constraints


MAX_TABLE_BYTES = 1_000_000


def _cell(text: Any) -> str:
    """A shape value as the table and a config agree on it: '16', '16.0' and 16 are '16'."""
    text = str(text).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


@dataclass
class LatencyTable:
    """Latencies measured on the device the model will run on (tune.latency_table): a row per
    shape, `keys` its columns of COST_KEYS; trials look theirs up instead of timing here."""

    keys: list[str]
    rows: dict[tuple, dict[str, float]]

    def lookup(self, values: dict[str, Any]) -> dict[str, float] | None:
        return self.rows.get(tuple(_cell(values[k]) for k in self.keys))

    def to_dict(self) -> dict[str, Any]:  # for the trials: plain values, whatever node
        return {"keys": self.keys, "rows": [[*k, v] for k, v in self.rows.items()]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LatencyTable":
        return cls(raw["keys"], {tuple(r[:-1]): r[-1] for r in raw["rows"]})


def read_latency_table(path: str) -> LatencyTable:
    """tune.latency_table's CSV: a column per shape key it varies (of COST_KEYS), then
    latency_ms and/or batch_latency_ms (positive numbers); ConfigError (one line) otherwise."""
    where = Path(path).expanduser()
    try:
        text = read_inside(where.parent, where.name, MAX_TABLE_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"tune.latency_table {shown_name(path)}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    other = [h for h in header if h not in (*COST_KEYS, *LATENCY)]
    if other or not set(header) & set(LATENCY) or len(set(header)) != len(header):
        raise ConfigError(f"tune.latency_table {shown_name(path)}: expected the columns "
                          f"{', '.join(COST_KEYS)} (those it varies) and latency_ms and/or "
                          f"batch_latency_ms, each once; found {shown_name(', '.join(header))}")
    keys = [h for h in header if h in COST_KEYS]
    rows: dict[tuple, dict[str, float]] = {}
    for line, raw in enumerate(csv.reader(io.StringIO(text)), 1):
        if line == 1 or not raw:
            continue
        if len(raw) != len(header):
            raise ConfigError(f"tune.latency_table {shown_name(path)}, line {line}: "
                              f"{len(raw)} cells, not {len(header)}")
        row = dict(zip(header, raw))
        shape = tuple(_cell(row[k]) for k in keys)
        try:
            costs = {n: float(row[n]) for n in header if n in LATENCY}
        except ValueError:
            costs = {}
        if not costs or not all(math.isfinite(v) and v > 0 for v in costs.values()) \
                or shape in rows:
            raise ConfigError(f"tune.latency_table {shown_name(path)}, line {line}: a shape "
                              "seen before, or a latency that is not a positive number")
        rows[shape] = costs
    return LatencyTable(keys, rows)


def check_table_covers(table: LatencyTable, path: str, space: dict[str, tuple[str, list]],
                       fixed: dict[str, Any], names: list[str]) -> None:
    """Every shape the search can draw has a row with every latency objective in `names`."""
    varied = [k for k in COST_KEYS if k in space]
    for key in varied:
        if key not in table.keys or space[key][0] != "choice":
            raise ConfigError(f"tune.latency_table {shown_name(path)}: the search varies {key}: "
                              f"the table needs a column for it, and the search a choice: [...]")
    values = [space[k][1] if k in space else [fixed[k]] for k in table.keys]
    for shape in itertools.product(*values):
        found = table.lookup(dict(zip(table.keys, shape)))
        missing = [n for n in names if n in LATENCY and n not in (found or {})]
        if found is None or missing:
            what = ", ".join(f"{k}={v}" for k, v in zip(table.keys, shape))
            raise ConfigError(f"tune.latency_table {shown_name(path)}: no "
                              f"{' and '.join(missing) or 'row'} for {what}")


def minimised(rows: list[dict[str, Any]], objectives: list[str]) -> np.ndarray:
    """(trials, objectives): each row's values, those to maximise negated."""
    sign = [-1.0 if OBJECTIVES[name][0] == "max" else 1.0 for name in objectives]
    return np.array([[s * float(row[name]) for s, name in zip(sign, objectives)] for row in rows],
                    dtype=float).reshape(len(rows), len(objectives))


def scored(rows: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """The rows with a finite value of every objective (a trial that failed early has none)."""
    return [r for r in rows if all(isinstance(r.get(n), (int, float)) and math.isfinite(r[n])
                                   for n in objectives)]


def front(rows: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """The non-dominated rows (of those scored), in the order given."""
    import moocore

    rows = scored(rows, objectives)
    if not rows:
        return []
    keep = moocore.is_nondominated(minimised(rows, objectives), keep_weakly=True)
    return [row for row, kept in zip(rows, keep) if kept]


def reference(points: np.ndarray, objectives: list[str]) -> np.ndarray:
    """The hypervolume's reference point for minimised `points`: a score's is 0 (no score is
    worse), a cost's is its worst value and a tenth of its range past it."""
    worst, best = points.max(axis=0), points.min(axis=0)
    past = worst + 0.1 * np.maximum(worst - best, np.abs(worst) * 1e-3 + 1e-12)
    return np.array([0.0 if OBJECTIVES[n][0] == "max" else past[i]
                     for i, n in enumerate(objectives)])


def hypervolume(points: np.ndarray, ref: np.ndarray, objectives: list[str]) -> float:
    """The volume dominated by minimised `points` up to `ref`, as a share of the box from the
    ideal corner (a score of 1, a cost of 0) to `ref`: 0 to 1."""
    import moocore

    inside = points[(points < ref).all(axis=1)]
    if not len(inside):
        return 0.0
    ideal = np.array([-1.0 if OBJECTIVES[n][0] == "max" else 0.0 for n in objectives])
    return float(moocore.hypervolume(inside, ref=ref) / np.prod(ref - ideal))


def hypervolume_history(rows: list[dict[str, Any]], objectives: list[str],
                        ref: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(trial-epochs so far, hypervolume) after each epoch any trial reported, in the order
    they were reported (a row's `curve` of (epoch, score) and `curve_at`, their unix times),
    each trial counted with its best score so far; `ref`: by default that of all the rows."""
    rows = scored(rows, objectives)
    if not rows:
        return []
    score = next(n for n in objectives if OBJECTIVES[n][0] == "max")
    ref = reference(minimised(rows, objectives), objectives) if ref is None else ref
    events = sorted((at, i, value) for i, row in enumerate(rows)
                    for (_, value), at in zip(row.get("curve", []), row.get("curve_at", []))
                    if at is not None and value == value)
    best: dict[int, float] = {}
    history = []
    for at, i, value in events:
        if history and value <= best.get(i, -math.inf):  # nothing new: the same volume
            history.append((len(history) + 1, history[-1][1]))
            continue
        best[i] = value
        now = [{**rows[j], score: v} for j, v in best.items()]
        history.append((len(history) + 1, hypervolume(minimised(now, objectives), ref,
                                                      objectives)))
    return history


def crowding(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front: for each objective, the gap
    between its neighbours on either side over the front's range; the ends' is infinite."""
    distance = np.zeros(len(points))
    for column in points.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[[0, -1]]] = np.inf
        if span > 0 and len(points) > 2:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def promotion_order(points: np.ndarray) -> list[int]:
    """Indices of minimised `points`, best first: by Pareto rank (non-dominated sorting), then
    within a rank by crowding distance (larger first: the ends of a front, then the points
    farthest from their neighbours), as NSGA-II orders them; then by the first objective
    (the score: of a front's two ends, the accurate one first)."""
    import moocore

    if len(points) == 0:
        return []
    ranks = moocore.pareto_rank(points)
    spread = np.zeros(len(points))
    for rank in np.unique(ranks):
        members = np.flatnonzero(ranks == rank)
        spread[members] = crowding(points[members])
    return sorted(range(len(points)), key=lambda i: (ranks[i], -spread[i], points[i][0], i))


class ParetoRungs:
    """ASHA's rungs (Ray's `_Bracket`: epochs grace * factor^k up to max_t) holding each
    trial's minimised objective vector as it reached them; a trial goes on past a rung only
    if it is among the best ceil(n / factor) of the n trials recorded there, itself included,
    in `promotion_order`."""

    def __init__(self, grace: int, max_t: int, factor: int):
        self.factor = factor
        count = int(math.log(max_t / grace) / math.log(factor) + 1 + 1e-9)
        self.rungs = [(grace * factor ** k, {}) for k in reversed(range(count))]

    def on_result(self, trial_id: str, iteration: int, vector: list[float]) -> bool:
        """Record `vector` at the highest rung `iteration` has newly reached; False: stop."""
        for milestone, recorded in self.rungs:
            if iteration < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = list(vector)
            ids = list(recorded)
            order = promotion_order(np.array([recorded[i] for i in ids], dtype=float))
            kept = {ids[i] for i in order[:math.ceil(len(ids) / self.factor)]}
            return trial_id in kept
        return True
