"""Several objectives: multi-objective ASHA's promotions (through the Ray scheduler, on
hand-made results), the front and its hypervolume, the pick's filter, what a trial measures
(the model's latency, parameters, FLOPs) and the network's depth, and bad inputs."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cifar_ray.errors import UserError
from cifar_ray.model import ResNet9
from cifar_ray.search.objectives import (
    Constraint,
    ParetoRungs,
    front,
    hypervolume,
    minimised,
    parse_pick,
    promotion_order,
    reference,
)
from tests.conftest import run_cli

TWO = ["val/acc", "latency_ms"]


def _report(scheduler, trial: str, epoch: int, acc: float, latency: float) -> str:
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial),
                                     {"training_iteration": epoch, "val/acc": acc,
                                      "latency_ms": latency})


def test_multi_objective_asha_stops_a_dominated_trial_and_keeps_the_front():
    from ray.tune.schedulers import TrialScheduler

    from cifar_ray.search.searchers import make_scheduler

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # Rungs at epochs 1, 2, 4 of 8; each keeps the best half (rounded up) of those it holds.
    scheduler = make_scheduler(8, 1, 2, objectives=TWO)
    assert [m for m, _ in scheduler.rungs.rungs] == [8, 4, 2, 1]
    assert _report(scheduler, "accurate", 1, 0.90, 5.0) == go  # alone at the rung
    # Worse and slower than "accurate": dominated, stopped though ASHA by accuracy alone
    # would compare it with one trial only, as here.
    assert _report(scheduler, "dominated", 1, 0.80, 6.0) == stop
    # Less accurate but 5x faster: on the front, and the front's best in its corner.
    assert _report(scheduler, "fast", 1, 0.70, 1.0) == go
    # The fourth: on the front by a hair (a little faster than "accurate"), but crowded
    # between the front's two ends: with 4 at the rung, 2 go on, the ends.
    assert _report(scheduler, "middle", 1, 0.895, 4.9) == stop
    # At the next rung "fast" comes first, alone; then "accurate": of the two ends, one goes
    # on: the more accurate (the score breaks the tie).
    assert _report(scheduler, "fast", 2, 0.60, 1.0) == go
    assert _report(scheduler, "accurate", 2, 0.92, 5.0) == go
    assert _report(scheduler, "fast", 3, 0.61, 1.0) == go  # judged once per rung
    assert _report(scheduler, "accurate", 8, 0.95, 5.0) == stop  # max_t: done


def test_a_score_alone_keeps_rays_asha():
    from cifar_ray.search.searchers import SeededASHA, make_scheduler

    assert type(make_scheduler(9, 1, 3, objectives=["val/acc"])) is SeededASHA


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


points = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)),
                  min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(points)
def test_promotion_order_puts_the_non_dominated_first_and_a_fronts_ends_before_its_middle(found):
    array = np.array(found, dtype=float)
    order = promotion_order(array)
    assert sorted(order) == list(range(len(found)))
    free = [i for i, p in enumerate(found) if not any(_dominates(q, p) for q in found)]
    assert set(order[:len(free)]) == set(free)
    # No point comes before one that dominates it.
    position = {i: k for k, i in enumerate(order)}
    for i, j in itertools.permutations(range(len(found)), 2):
        if _dominates(found[i], found[j]):
            assert position[i] < position[j]
    # The first front's ends (its least and its largest in each objective) before the rest.
    ends = set()
    for k in range(3):
        ranked = sorted(free, key=lambda i: found[i][k])  # stable: ties in index order
        ends |= {ranked[0], ranked[-1]}
    assert all(position[e] < position[i] for e in ends for i in set(free) - ends)


def test_the_rungs_keep_a_share_and_judge_each_trial_once_per_rung():
    rungs = ParetoRungs(grace=1, max_t=4, factor=2)
    assert [m for m, _ in rungs.rungs] == [4, 2, 1]
    kept = [rungs.on_result(f"t{i}", 1, [-acc, 1.0]) for i, acc in enumerate([0.5, 0.4, 0.9, 0.6])]
    assert kept == [True, False, True, True]  # among the ceil(n/2) best of those recorded so far
    assert rungs.on_result("t0", 1, [-0.1, 1.0])  # already judged at this rung


def test_the_front_and_its_hypervolume():
    rows = [{"trial_id": "a", "val/acc": 0.9, "latency_ms": 4.0},
            {"trial_id": "b", "val/acc": 0.6, "latency_ms": 1.0},
            {"trial_id": "c", "val/acc": 0.5, "latency_ms": 2.0},  # dominated by b
            {"trial_id": "d", "val/acc": None, "latency_ms": 0.5}]  # failed: no score
    assert [r["trial_id"] for r in front(rows, TWO)] == ["a", "b"]
    points = minimised(front(rows, TWO), TWO)
    ref = reference(points, TWO)
    assert ref[0] == 0.0 and ref[1] == pytest.approx(4.3)
    # Two boxes up to ref: (0.9 x 0.3) and (0.6 x 3.3) overlap in (0.6 x 0.3); over 1 x 4.3.
    assert hypervolume(points, ref, TWO) == pytest.approx((0.27 + 1.98 - 0.18) / 4.3)
    # A point past the reference adds nothing.
    assert hypervolume(np.array([[-0.5, 9.0]]), ref, TWO) == 0.0


def _rows():
    return [{"trial_id": "big", "best_score": 0.95, "val/acc": 0.95, "latency_ms": 3.0},
            {"trial_id": "mid", "best_score": 0.90, "val/acc": 0.90, "latency_ms": 1.5},
            {"trial_id": "slow_and_worse", "best_score": 0.85, "val/acc": 0.85,
             "latency_ms": 4.0},
            {"trial_id": "small", "best_score": 0.70, "val/acc": 0.70, "latency_ms": 0.4}]


@pytest.mark.parametrize("pick, chosen", [
    ("", "big"),  # no constraint: the most accurate
    ("latency_ms <= 2", "mid"),
    ("latency_ms < 1.5", "small"),
    ("latency_ms <= 3, val/acc >= 0.92", "big"),
    ("latency_ms >= 3.5", "slow_and_worse"),  # a lower bound: off the front
])
def test_the_pick_retrains_the_most_accurate_that_meets_it(pick, chosen, tmp_path):
    from cifar_ray.pipeline import choose

    best = choose(_rows(), tmp_path, "", "val/acc", TWO, parse_pick(pick, TWO))
    assert best["trial_id"] == chosen


def test_a_pick_nothing_meets_names_the_closest_before_the_retrain(tmp_path):
    from cifar_ray.pipeline import choose

    with pytest.raises(UserError) as raised:
        choose(_rows(), tmp_path, "", "val/acc", TWO, parse_pick("latency_ms <= 0.3", TWO))
    message = str(raised.value)
    assert "\n" not in message and "no trial meets it" in message
    assert "the closest is trial small" in message and "latency_ms 0.4" in message


def test_a_constraint_measures_how_far_off_a_value_is():
    c = Constraint("latency_ms", "<=", 2.0)
    assert c.holds(2.0) and not c.holds(2.5) and not c.holds(None) and not c.holds(math.nan)
    assert c.excess(1.0) == 0 and c.excess(3.0) == pytest.approx(0.5)


def _module(**sections):
    from cifar_ray.module import LitResNet9

    return LitResNet9(class_names=[str(i) for i in range(10)], **sections).eval()


def test_a_trial_measures_latency_at_both_batch_sizes_parameters_and_flops():
    from cifar_ray.footprint import measure
    from cifar_ray.search.plan import training_gflop_per_image

    module = _module(model={"width": 8, "res_blocks": 2}, data={"image_size": 16}).train()
    rng = torch.get_rng_state()
    found = measure(module, latency_batch=8)
    # A trial measures before it trains: its model left training (BatchNorm's batch
    # statistics), its random draws its own.
    assert all(m.training for m in module.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(found) == {"params", "flops", "latency_ms", "batch_latency_ms"}
    assert found["params"] == sum(p.numel() for p in module.model.parameters())
    assert 0 < found["latency_ms"] < found["batch_latency_ms"] < 1000
    # The forward's FLOPs: the plan's count of the convolutions (a third of a training
    # step's), plus the small rest (pooling, the classifier).
    convs = training_gflop_per_image(8, 16, 2) / 3 * 1e9
    assert convs <= found["flops"] < 1.05 * convs
    # Test-time flips: four views, four times the FLOPs.
    flips = measure(_module(model={"width": 8, "res_blocks": 2}, data={"image_size": 16},
                            eval={"tta": "flips"}))
    assert flips["flops"] == pytest.approx(4 * found["flops"], rel=0.01)
    assert "latency_ms" not in flips  # measured only when asked


def test_depth_is_res_blocks_and_one_is_resnet9_itself():
    classic = ResNet9(10, 16)
    assert set(ResNet9(10, 16, res_blocks=1).state_dict()) == set(classic.state_dict())
    counts = [sum(p.numel() for p in ResNet9(10, 16, n).parameters()) for n in range(4)]
    assert counts[0] < counts[1] < counts[2] < counts[3]
    # Each block: two 3x3 convolutions and BatchNorms at 2w and at 8w channels.
    block = 2 * (9 * 32 * 32 + 2 * 32) + 2 * (9 * 128 * 128 + 2 * 128)
    assert counts[2] - counts[1] == counts[3] - counts[2] == block
    x = torch.rand(2, 3, 32, 32)
    assert ResNet9(10, 16, res_blocks=0)(x).shape == (2, 10)


def test_gradcam_explains_a_network_without_residual_blocks():
    from cifar_ray.explain import compute_cams

    module = _module(model={"width": 8, "res_blocks": 0})
    cams = compute_cams(module, torch.rand(2, 3, 32, 32), [0, 1], "layer3_R", torch.device("cpu"))
    assert np.asarray(cams).shape[0] == 2 and np.isfinite(np.asarray(cams)).all()


def test_the_plan_costs_the_searched_shapes(tmp_path):
    from cifar_ray.search.plan import make_plan
    from cifar_ray.search.settings import SearchConfig

    def seconds(search):
        cfg = SearchConfig()
        cfg.search.update(search)
        cfg.tune.cpus_per_worker = 1  # as the search resolves -1
        cfg.validate()
        return make_plan(cfg, 1, 0.0, cpus_total=2, sizes=(1000, 100)).epoch_seconds

    small = seconds({"model.width": {"choice": [8]}})
    assert seconds({"model.width": {"choice": [8, 64]}}) > 10 * small
    assert seconds({"model.width": {"choice": [8]}, "model.res_blocks": {"choice": [2]}}) > small
    assert seconds({"model.width": {"choice": [8]}, "data.image_size": {"choice": [64]}}) \
        == pytest.approx(4 * small)


@pytest.mark.parametrize("flags, words", [
    (["--objectives", "val/acc,lateny_ms"], "unknown objective 'lateny_ms'"),
    (["--objectives", "latency_ms,params"], "needs exactly one validation score"),
    (["--objectives", "val/acc,params,params"], "names an objective twice"),
    (["--objectives", "val/acc,params", "--pick", "latency_ms <= 2"],
     "latency_ms is not measured"),
    (["--objectives", "val/acc,latency_ms", "--pick", "latency_ms <= abc"],
     "'abc' is not a finite number"),
    (["--objectives", "val/acc,latency_ms", "--pick", "latency_ms == 2"],
     "is not NAME OP NUMBER"),
    (["--pick", "params <= 1e6"], "params is not measured"),
    (["--objectives", "val/acc,latency_ms", "--metric", "val/f1"], "name different scores"),
    (["--objectives", "val/acc,params", "--search", "model.width=choice:8,16", "--warm-start",
      "x"], "not supported yet"),
    (["--objectives", "val/acc,latency_ms"], "every trial's model would cost the same"),
    (["--res-blocks", "9"], "model.res_blocks must be in [0, 8]"),
])
def test_bad_objectives_and_picks_are_one_line_exit_2(tmp_path, flags, words):
    proc = run_cli("cifar_ray.tune", "--output-dir", str(tmp_path / "out"), "--plan", *flags)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


TABLE = "model.width,model.res_blocks,latency_ms,batch_latency_ms\n" \
        "8,0,0.5,4\n8,1,0.9,7\n16,0,1.2,9\n16.0,1,2.5,20\n"


def test_a_latency_table_gives_each_shape_its_device_latency(tmp_path):
    from cifar_ray.config import Config, flat
    from cifar_ray.search.objectives import LatencyTable, read_latency_table

    (tmp_path / "phone.csv").write_text(TABLE)
    table = read_latency_table(str(tmp_path / "phone.csv"))
    assert table.keys == ["model.width", "model.res_blocks"]
    # As a trial looks it up: its whole config, after the trip to the worker.
    cfg = Config.from_dict({"model": {"width": 16, "res_blocks": 1}})
    found = LatencyTable.from_dict(table.to_dict()).lookup(flat(cfg))
    assert found == {"latency_ms": 2.5, "batch_latency_ms": 20.0}
    assert table.lookup({"model.width": 32, "model.res_blocks": 1}) is None


@pytest.mark.parametrize("text, words", [
    ("model.width,speed\n8,1\n", "expected the columns"),
    ("model.width\n8\n", "expected the columns"),
    ("model.width,latency_ms\n8,-1\n", "line 2: a shape seen before, or a latency that is not"),
    ("model.width,latency_ms\n8,abc\n", "line 2"),
    ("model.width,latency_ms\n8,1\n8,2\n", "line 3: a shape seen before"),
    ("model.width,latency_ms\n8,1,5\n", "line 2: 3 cells, not 2"),
    ("model.width,latency_ms\n8,nan\n", "line 2"),
])
def test_a_bad_latency_table_is_one_line(tmp_path, text, words):
    from cifar_ray.errors import ConfigError
    from cifar_ray.search.objectives import read_latency_table

    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ConfigError) as raised:
        read_latency_table(str(tmp_path / "t.csv"))
    assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("extra, words", [
    (["--search", "model.width=choice:8,16,32"], "no latency_ms for model.width=32"),
    (["--search", "model.width=randint:8,17"], "the search a choice"),
    (["--search", "model.width=choice:8,16", "--search", "data.image_size=choice:16,32"],
     "varies data.image_size"),
])
def test_a_latency_table_must_cover_every_shape_the_search_draws(tmp_path, extra, words):
    (tmp_path / "phone.csv").write_text(TABLE)
    proc = run_cli("cifar_ray.tune", "--output-dir", str(tmp_path / "out"), "--plan",
                   "--objectives", "val/acc,latency_ms", "--latency-table",
                   str(tmp_path / "phone.csv"), *extra)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("cifar_ray.tune", "--output-dir", str(tmp_path / "out"), "--plan",
                   "--objectives", "val/acc,latency_ms", "--latency-table",
                   str(tmp_path / "phone.csv"), "--search", "model.width=choice:8,16",
                   "--search", "model.res_blocks=choice:0,1")
    assert proc.returncode == 0 and "(latencies: " in proc.stdout, proc.stderr


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
@example("x" * 1000)
@example("val/acc,\x1b[2J\u202e" * 40)
@example("latency_ms <= " + "9" * 1000)
def test_any_objectives_or_pick_text_is_read_or_refused_in_one_short_line(text):
    from cifar_ray.errors import ConfigError
    from cifar_ray.search.objectives import parse_objectives

    for parse in (lambda t: parse_objectives(t, "val/acc"), lambda t: parse_pick(t, TWO)):
        try:
            parse(text)
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and message.isprintable() and len(message) < 400
