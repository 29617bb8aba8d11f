"""ai.training rounds: checks, aggregation, outer step, SQL state, deadlines (2.3.5, DiLoCo).

The slices run on the real PyTorch runtime; aggregation is the real coordinator/rounds.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from nodeclient.coordinator import audit, rounds, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.selection import Candidate
from nodeclient.coordinator.store import Database
from nodeclient.node.runtimes.torch_train import TorchTrainRuntime, predict
from nodeclient.workloads import training as tr
from nodeclient.workloads.tensors import encode_tensors
from tests.coordinator.conftest import Running, make_node
from tests.node.test_torch_runtime import _reference

MLP = [
    {"type": "Linear", "in": 64, "out": 32},
    {"type": "ReLU"},
    {"type": "Linear", "in": 32, "out": 10},
]
NOW = 1_765_000_000.0
Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]; 25% held out, stratified."""
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=0, stratify=y))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def runtime() -> TorchTrainRuntime:
    return TorchTrainRuntime()


def _job(digits: tuple, **config: object) -> tr.JobRequest:
    config.setdefault("inner", tr.InnerOptimizer(lr=3e-3))
    return tr.JobRequest(tr.ModelSpec.parse(MLP), tr.TrainingConfig(**config), digits[0], digits[2])  # type: ignore[arg-type]


def _subs(payloads: list[bytes], results: list[bytes | None]) -> list[rounds.Submission]:
    return [
        rounds.Submission(i, tr.SliceRequest.decode(p).shard_sha256, r)
        for i, (p, r) in enumerate(zip(payloads, results, strict=True))
    ]


def _train_in_process(
    job: tr.JobRequest, runtime: TorchTrainRuntime, slices: int
) -> tuple[Arrays, list]:
    """R rounds without a network: run each slice, aggregate, outer step, next payloads."""
    cfg, shapes = job.config, job.model.parameter_shapes()
    payloads = job.round_zero(slices)
    weights = tr.decode_weights(job.initial_weights(), job.model)
    momentum = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    metrics = []
    for r in range(cfg.rounds):
        results: list[bytes | None] = [runtime.run(p) for p in payloads]
        base = tr.sha256_hex(tr.weights_container(weights))
        outcome = rounds.aggregate(
            _subs(payloads, results), shapes=shapes, base_sha256=base, config=cfg
        )
        assert outcome.delta is not None, outcome.dropped
        metrics.append(outcome.metrics(r, base))
        weights, momentum = rounds.outer_step(weights, momentum, outcome.delta, cfg.outer)
        container = tr.weights_container(weights)
        payloads = [
            tr.SliceRequest(
                job.model, container, tr.SliceRequest.decode(p).shard, tr.plan_for(cfg, r + 1, i)
            ).encode()
            for i, p in enumerate(payloads)
        ]
    return weights, metrics


def _accuracy(weights: Arrays, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(tr.ModelSpec.parse(MLP), weights, x).argmax(axis=1) == y).mean())


def test_digits_mlp_reaches_accuracy_over_rounds(digits: tuple, runtime: TorchTrainRuntime) -> None:
    """MLP 64-32-10, 2 slices x 4 rounds x 50 AdamW steps, DiLoCo outer step: held-out
    accuracy goes from chance to above 0.85, and the mean slice loss falls round by round."""
    job = _job(digits, rounds=4, inner_steps=50)
    before = _accuracy(tr.decode_weights(job.initial_weights(), job.model), digits[1], digits[3])
    weights, metrics = _train_in_process(job, runtime, slices=2)
    after = _accuracy(weights, digits[1], digits[3])
    assert before < 0.3
    assert after > 0.85, after
    assert [mt["used"] for mt in metrics] == [[0, 1]] * 4
    assert metrics[-1]["last_loss"] < metrics[0]["first_loss"] / 4


def test_round_matches_a_one_process_reference(digits: tuple, runtime: TorchTrainRuntime) -> None:
    """Two rounds of runtime + rounds.aggregate + outer_step equal, within 1e-6, plain torch in
    one process: each slice's AdamW loop, the mean, and torch.optim.SGD(nesterov=True)."""
    job = _job(digits, rounds=2, inner_steps=10)
    ours, _ = _train_in_process(job, runtime, slices=2)
    ref = {
        k: torch.tensor(np.array(v))
        for k, v in tr.decode_weights(job.initial_weights(), job.model).items()
    }
    params = {k: torch.nn.Parameter(v.clone()) for k, v in ref.items()}
    outer = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    payloads = job.round_zero(2)
    for r in range(2):
        deltas = [_reference(p)[0] for p in payloads]
        for name, p in params.items():
            p.grad = torch.tensor(
                np.mean([d[name] for d in deltas], axis=0, dtype=np.float64).astype(np.float32)
            )
        outer.step()
        container = tr.weights_container({k: v.detach().numpy() for k, v in params.items()})
        payloads = [
            tr.SliceRequest(
                job.model,
                container,
                tr.SliceRequest.decode(p).shard,
                tr.plan_for(job.config, r + 1, i),
            ).encode()
            for i, p in enumerate(payloads)
        ]
    for name, p in params.items():
        np.testing.assert_allclose(ours[name], p.detach().numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (
            lambda d: {**d, "0.bias": np.full_like(d["0.bias"], np.nan)},
            "'0.bias' holds NaN or infinity",
        ),
        (lambda d: {k: v * 1e4 for k, v in d.items()}, "times the median"),
    ],
)
def test_nan_or_huge_slice_is_rejected_and_the_round_completes(
    digits: tuple, runtime: TorchTrainRuntime, spoil: Callable[[Arrays], Arrays], reason: str
) -> None:
    """Of three slices, a NaN or outsized pseudo-gradient is dropped with a reason; the mean is
    that of the other two."""
    job = _job(digits, inner_steps=5)
    payloads = job.round_zero(3)
    good0, good1, bad = (tr.PseudoGradient.decode(runtime.run(p),
                                                  shapes=job.model.parameter_shapes(),
                                                  grad_dtype="F32") for p in payloads)  # fmt: skip
    spoiled = tr.PseudoGradient(spoil(bad.deltas), bad.base_sha256, bad.shard_sha256, bad.steps,
                                bad.first_loss, bad.last_loss).encode()  # fmt: skip
    outcome = rounds.aggregate(
        _subs(payloads, [good0.encode(), good1.encode(), spoiled]),
        shapes=job.model.parameter_shapes(), base_sha256=good0.base_sha256, config=job.config,
    )  # fmt: skip
    assert outcome.used == (0, 1)
    assert outcome.dropped[0][0] == 2
    assert reason in outcome.dropped[0][1]
    assert outcome.delta is not None
    for name, value in good0.deltas.items():
        both = value.astype(np.float64) + good1.deltas[name].astype(np.float64)
        np.testing.assert_array_equal(outcome.delta[name], (both / 2).astype(np.float32))


def _synthetic(
    scale: float, *, base: str = "a" * 64, shard: str = "b" * 64, steps: int = 100
) -> bytes:
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.full(s, scale, np.float32) for k, s in shapes.items()}
    return tr.PseudoGradient(deltas, base, shard, steps, 2.0, 1.0).encode()


def test_clipping_scales_down_to_clip_ratio_times_the_median() -> None:
    """Norms n=(1x, 1x, 3x): median 1x, clip_ratio 2 scales the third to norm 2x; then the mean."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    subs = [rounds.Submission(i, "b" * 64, _synthetic(s)) for i, s in enumerate([0.01, 0.01, 0.03])]
    outcome = rounds.aggregate(
        subs, shapes=shapes, base_sha256="a" * 64, config=tr.TrainingConfig()
    )
    assert (outcome.used, outcome.clipped, outcome.dropped) == ((0, 1, 2), (2,), ())
    assert outcome.delta is not None
    np.testing.assert_allclose(outcome.delta["0.weight"], (0.01 + 0.01 + 0.02) / 3, rtol=1e-6)


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (_synthetic(0.01, base="c" * 64), f"computed from weights '{'c' * 64}'"),
        (_synthetic(0.01, shard="c" * 64), f"computed on shard '{'c' * 64}'"),
        (_synthetic(0.01, steps=99), "ran 99 steps"),
        (_synthetic(1e6), "exceeds max_norm"),
        (_synthetic(0.0), "all zeros"),
        (b"short", "truncated"),
        (None, "missed the deadline"),
    ],
    ids=["base", "shard", "steps", "max_norm", "zeros", "format", "missing"],
)
def test_each_check_drops_the_slice_with_its_reason(result: bytes | None, reason: str) -> None:
    """Base hash, shard hash, step count, absolute norm, zeros, format, missing result: each is
    named."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    subs = [
        rounds.Submission(0, "b" * 64, _synthetic(0.01)),
        rounds.Submission(1, "b" * 64, result, "missed the deadline of round 0"),
    ]
    outcome = rounds.aggregate(
        subs, shapes=shapes, base_sha256="a" * 64, config=tr.TrainingConfig()
    )
    assert outcome.used == (0,)
    assert reason in dict(outcome.dropped)[1]


def _two_slices(scales: tuple[float, float], **config: object) -> rounds.RoundOutcome:
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    subs = [rounds.Submission(i, "b" * 64, _synthetic(s)) for i, s in enumerate(scales)]
    return rounds.aggregate(
        subs,
        shapes=shapes,
        base_sha256="a" * 64,
        config=tr.TrainingConfig(**config),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("scales", [(0.0, 0.01), (0.01, 0.0)])
def test_two_slices_an_all_zero_pseudo_gradient_is_refused_and_the_other_used(
    scales: tuple[float, float],
) -> None:
    """With two slices, a node returning zeros cannot veto the honest slice as the smaller
    update: the zeros are refused with a reason and the honest one is the round's update."""
    outcome = _two_slices(scales)
    zero, honest = scales.index(0.0), scales.index(0.01)
    assert outcome.used == (honest,)
    assert [s for s, _ in outcome.dropped] == [zero]
    assert "all zeros" in outcome.dropped[0][1]
    assert outcome.delta is not None
    np.testing.assert_array_equal(outcome.delta["0.weight"], np.float32(0.01))


@pytest.mark.parametrize(
    ("scales", "config", "kept"),
    [
        ((0.01, 0.5), {}, (0.01, 0.02)),  # 50x apart: the larger counts for 2x the smaller
        ((100.0, 0.01), {}, (0.02, 0.01)),  # a forgery under max_norm no longer takes the round
        ((1e-20, 0.01), {}, (1e-20, 2e-20)),  # a tiny forgery: the round makes no progress
        ((0.01, 0.03), {"clip_ratio": 1.0}, (0.01, 0.01)),
        ((0.01, 0.015), {}, (0.01, 0.015)),  # honest slices of similar norms: unchanged
    ],
)
def test_two_slices_are_both_used_the_larger_clipped_against_the_smaller(
    scales: tuple[float, float], config: dict, kept: tuple[float, float]
) -> None:
    """With two valid slices neither can be told the outlier, so neither is dropped; the
    larger is clipped to clip_ratio times the smaller's norm, and the two are averaged.
    (Before, neither was clipped: one forged update under max_norm, 1e6, was the round's.)"""
    outcome = _two_slices(scales, **config)
    larger = 0 if scales[0] > scales[1] else 1
    clipped = () if kept == scales else (larger,)
    assert (outcome.used, outcome.dropped, outcome.clipped) == ((0, 1), (), clipped)
    assert outcome.delta is not None
    np.testing.assert_allclose(outcome.delta["0.weight"], sum(kept) / 2, rtol=1e-5)


@pytest.mark.parametrize("count", [3, 5])
def test_with_three_slices_or_more_the_outlier_is_dropped(count: int) -> None:
    """From three valid slices on, a norm over reject_ratio times the median of the others is
    dropped with its reason and the rest are averaged."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    scales = [0.01] * (count - 1) + [0.5]
    subs = [rounds.Submission(i, "b" * 64, _synthetic(s)) for i, s in enumerate(scales)]
    outcome = rounds.aggregate(
        subs, shapes=shapes, base_sha256="a" * 64, config=tr.TrainingConfig()
    )
    assert outcome.used == tuple(range(count - 1))
    assert [s for s, _ in outcome.dropped] == [count - 1]
    assert "over 10 times the median" in outcome.dropped[0][1]
    assert outcome.delta is not None
    np.testing.assert_allclose(outcome.delta["0.weight"], 0.01, rtol=1e-6)


def _near_zero() -> bytes:
    """The cheapest forgery that is not all zeros: zeros but one element of 1e-30."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    deltas["0.weight"][0, 0] = 1e-30
    return tr.PseudoGradient(deltas, "a" * 64, "b" * 64, 100, 2.0, 1.0).encode()


def _round_of(results: list[bytes]) -> rounds.RoundOutcome:
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    subs = [rounds.Submission(i, "b" * 64, r) for i, r in enumerate(results)]
    return rounds.aggregate(subs, shapes=shapes, base_sha256="a" * 64, config=tr.TrainingConfig())


@pytest.mark.parametrize(("count", "forged"), [(3, 0), (3, 1), (3, 2), (4, 3), (5, 0)])
def test_a_near_zero_forgery_is_dropped_as_too_small(count: int, forged: int) -> None:
    """From three valid slices on, a norm under 1/reject_ratio of the (lower) median of the
    others is dropped with its reason: a near-zero forgery no longer dilutes the mean of the
    honest slices, which is theirs alone."""
    results = [_synthetic(0.01)] * count
    results[forged] = _near_zero()
    outcome = _round_of(results)
    assert outcome.used == tuple(i for i in range(count) if i != forged)
    assert [s for s, _ in outcome.dropped] == [forged]
    assert outcome.dropped[0][1].startswith("norm 1e-30 is under 1/10 of the lower median ")
    assert outcome.delta is not None
    np.testing.assert_allclose(outcome.delta["0.weight"], 0.01, rtol=1e-6)


def test_two_near_zero_forgeries_of_three_still_outvote_the_honest_slice() -> None:
    """What two colluding nodes of three can still do: norms (t, t, h) are (h, h, H) scaled,
    so the pair is used and the honest slice dropped as too large. The round's update is
    then negligible (no progress), never a diluted honest one, and neither forgery is
    dropped as too small, each having the other as its lower median."""
    outcome = _round_of([_near_zero(), _synthetic(0.01), _near_zero()])
    assert outcome.used == (0, 2)
    assert [s for s, _ in outcome.dropped] == [1]
    assert "over 10 times the median" in outcome.dropped[0][1]
    assert outcome.delta is not None
    assert float(np.abs(outcome.delta["0.weight"]).max()) < 1e-29


def test_with_no_majority_every_slice_can_be_dropped() -> None:
    """Two near-zero forgeries and two honest slices: each pair is an outlier against the
    other, so the round has no valid slice (the job fails) rather than a forged update."""
    outcome = _round_of([_near_zero(), _synthetic(0.01), _near_zero(), _synthetic(0.01)])
    assert (outcome.delta, outcome.used) == (None, ())
    assert [s for s, _ in outcome.dropped] == [0, 1, 2, 3]


@pytest.mark.parametrize("scales", [[0.01, 0.5, 0.01], [0.01, 0.5, 0.01, 0.5, 0.01]])
def test_a_large_minority_cannot_have_the_honest_slices_dropped_as_too_small(
    scales: list[float],
) -> None:
    """The lower bound uses the lower median of the others: their plain median (with three
    slices, the mean of two) is raised by a large forged norm, until every honest slice is
    under a tenth of it and the whole round is dropped. Here only the large ones are."""
    outcome = _round_of([_synthetic(s) for s in scales])
    assert outcome.used == tuple(i for i, s in enumerate(scales) if s == 0.01)
    assert all("over 10 times the median" in why for _, why in outcome.dropped)
    assert outcome.delta is not None
    np.testing.assert_allclose(outcome.delta["0.weight"], 0.01, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_is_torch_sgd_with_momentum(nesterov: bool) -> None:
    """Three outer steps equal torch.optim.SGD(lr 0.7, momentum 0.9) within 1e-6."""
    rng = np.random.default_rng(1)
    w = {"a": rng.normal(size=(3, 4)).astype(np.float32)}
    mom = {"a": np.zeros((3, 4), np.float32)}
    param = torch.nn.Parameter(torch.tensor(w["a"]))
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=nesterov)
    for _ in range(3):
        g = rng.normal(size=(3, 4)).astype(np.float32)
        w, mom = rounds.outer_step(w, mom, {"a": g}, tr.OuterOptimizer(nesterov=nesterov))
        param.grad = torch.tensor(g)
        sgd.step()
    np.testing.assert_allclose(w["a"], param.detach().numpy(), atol=1e-6, rtol=0)


# --- rounds in SQL ---------------------------------------------------------------------------


def _insert(db: Database, job: tr.JobRequest, slices: int, *, stubs: bool = True) -> str:
    """Insert *job* as POST /v1/jobs does: round 0's weights stored once, slice stubs; or,
    without *stubs*, as a coordinator before round inputs did (whole slice payloads)."""
    payload = job.encode()
    meta = tr.job_meta(payload, len(payload))
    shared, parts = tr.split_shared(payload, slices) if stubs else (None, tr.split(payload, slices))
    return db.run_sync(lambda s: store.insert_job(
        s, workload_class=tr.CLASS, payloads=parts, min_tier=0, region=None, meta=meta, now=NOW,
        shared=shared))  # fmt: skip


def _sent(s: Session, t: m.Task) -> bytes:
    """The payload the scheduler seals for *t*: its stored slice with its round's weights."""
    sha256, data = store.round_inputs(s, [t.job_id]).get(t.job_id, ("", b""))
    return tr.expand(t.payload, data, sha256)


def _complete_round(
    db: Database, job_id: str, runtime: TorchTrainRuntime, *, spoil: bool = False
) -> str | None:
    """Every slice of the current round succeeds with the runtime's result; close the round."""

    def tx(s: m.Session) -> str | None:  # type: ignore[name-defined]
        job = s.get_one(m.Job, job_id)
        for t in s.scalars(
            select(m.Task).where(m.Task.job_id == job_id, m.Task.round_index == job.round_index)
        ):
            t.status, t.result = m.SUCCEEDED, b"garbage" if spoil else runtime.run(_sent(s, t))
        return rounds.finish_round_tx(s, job, NOW)

    return db.run_sync(tx)


def test_outer_momentum_survives_a_coordinator_restart(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path
) -> None:
    """Round 0 closes, the database is closed and reopened, round 1 closes: the final weights
    are those of an uninterrupted run, which needs the momentum kept in SQL."""
    job = _job(digits, rounds=2, inner_steps=10)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = Database(url)
    job_id = _insert(db, job, 2)
    assert _complete_round(db, job_id, runtime) is None
    db.close()
    db = Database(url)
    assert db.run_sync(lambda s: s.get_one(m.Job, job_id).round_index) == 1
    assert _complete_round(db, job_id, runtime) == m.SUCCEEDED
    result = db.run_sync(lambda s: s.get_one(m.Job, job_id).result)
    db.close()
    weights, metrics = tr.decode_final(result)
    expected, _ = _train_in_process(job, runtime, slices=2)
    assert tr.weights_container(weights) == tr.weights_container(expected)
    assert [mt["round"] for mt in metrics] == [0, 1]
    no_momentum = _job(digits, rounds=2, inner_steps=10, outer=tr.OuterOptimizer(momentum=0.0))
    assert tr.weights_container(
        _train_in_process(no_momentum, runtime, 2)[0]
    ) != tr.weights_container(weights)


def test_each_round_writes_only_its_own_metrics_row(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path
) -> None:
    """A round's close adds one train_rounds row; the state holds weights and momentum only,
    so its size does not grow with the rounds, and the final result lists every row."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _insert(db, _job(digits, rounds=3, inner_steps=5), 2)
    sizes = []
    for _ in range(3):
        _complete_round(db, job_id, runtime)
        sizes.append(db.run_sync(lambda s: len(s.get_one(m.Job, job_id).train_state)))
    rows = db.run_sync(lambda s: s.execute(select(m.TrainRound.round_index, m.TrainRound.metrics)
                                           .where(m.TrainRound.job_id == job_id)).all())  # fmt: skip
    result = db.run_sync(lambda s: s.get_one(m.Job, job_id).result)
    db.close()
    assert len(set(sizes)) == 1  # the same bytes of weights and momentum every round
    assert sorted(r for r, _ in rows) == [0, 1, 2]
    _, metrics = tr.decode_final(result)
    assert metrics == [json.loads(text) for _, text in sorted(rows)]
    assert [mt["used"] for mt in metrics] == [[0, 1]] * 3


def test_a_state_that_still_carries_its_metrics_is_moved_into_rows(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path
) -> None:
    """A job under way from before train_rounds: its state carries thousands of rounds of
    metrics in its metadata, over the default header limit. The next close moves them into
    rows, and the final result carries them all, in order, with the new round after them."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _insert(db, _job(digits, rounds=2, inner_steps=5), 2)
    _complete_round(db, job_id, runtime)
    old = [{"round": -i, "note": "x" * 300} for i in range(5000, 0, -1)]  # 1.6 MB of JSON

    def legacy(s: Session) -> None:
        for row in s.scalars(select(m.TrainRound).where(m.TrainRound.job_id == job_id)):
            old.append(json.loads(row.metrics))  # round 0, as the old state would hold it
            s.delete(row)
        job = s.get_one(m.Job, job_id)
        state = rounds.TrainState.decode(job.train_state)
        tensors = {"weights/" + k: v for k, v in state.weights.items()}
        tensors |= {"momentum/" + k: v for k, v in state.momentum.items()}
        meta = {"class": tr.CLASS, "kind": "state", "metrics": tr.dump_json(old)}
        job.train_state = encode_tensors(tensors, metadata=meta)

    db.run_sync(legacy)
    assert _complete_round(db, job_id, runtime) == m.SUCCEEDED
    result = db.run_sync(lambda s: s.get_one(m.Job, job_id).result)
    db.close()
    _, metrics = tr.decode_final(result)
    assert len(metrics) == 5002
    assert metrics[:5001] == old
    assert metrics[-1]["round"] == 1


def test_a_round_without_a_valid_slice_fails_the_job(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path
) -> None:
    """When every slice is rejected the job fails, and the reason names each slice's fault."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _insert(db, _job(digits, inner_steps=5), 2)
    assert _complete_round(db, job_id, runtime, spoil=True) == m.FAILED
    status, reason = db.run_sync(
        lambda s: (s.get_one(m.Job, job_id).status, s.get_one(m.Job, job_id).reason)
    )
    db.close()
    assert status == m.FAILED
    assert reason.startswith("round 0 has no valid pseudo-gradient: slice 0: ")
    assert "slice 1: " in reason


def _overdue_round(db: Database, job: tr.JobRequest, *, result: bytes | None = None) -> str:
    """A 2-slice job whose slice 0 returned *result* (by default a valid pseudo-gradient) and
    whose slice 1 is still leased to a node, both since NOW."""
    job_id = _insert(db, job, 2)

    def tx(s: Session) -> None:
        s.get_one(m.Job, job_id).status = m.RUNNING
        for t in s.scalars(select(m.Task).where(m.Task.job_id == job_id)):
            request = tr.SliceRequest.decode(_sent(s, t))
            t.status, t.node_id, t.leased_at, t.attempts = m.LEASED, "node-1", NOW, 1
            if t.slice_index == 0:
                t.status = m.SUCCEEDED
                t.result = result or _synthetic(
                    0.01, base=request.weights_sha256, shard=request.shard_sha256,
                    steps=job.config.inner_steps,
                )  # fmt: skip

    db.run_sync(tx)
    return job_id


def _job_row(db: Database, job_id: str) -> tuple[str, str | None, list[tuple[str, str | None]]]:
    def tx(s: Session) -> tuple[str, str | None, list[tuple[str, str | None]]]:
        job = s.get_one(m.Job, job_id)
        return job.status, job.reason, [(t.status, t.reason) for t in store.job_tasks(s, job_id)]

    return db.run_sync(tx)


def test_a_stored_result_with_a_lone_surrogate_hash_cannot_poison_the_deadline(
    digits: tuple, tmp_path: Path
) -> None:
    """A result whose base_sha256 is a lone surrogate, already stored (accepted before results
    were checked for it): at the deadline the round closes, the slice is dropped with an
    ASCII reason, and the transaction commits instead of failing on every tick."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    shard = tr.SliceRequest.decode(_job(digits).round_zero(2)[0]).shard_sha256
    poisoned = _synthetic(0.01, base="QQQQQQ", shard=shard, steps=5)
    poisoned = poisoned.replace(b'"QQQQQQ"', b'"\\ud800"')
    job_id = _overdue_round(db, _job(digits, inner_steps=5), result=poisoned)
    closes = db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 601))
    status, reason, tasks = _job_row(db, job_id)
    db.close()
    assert [c.job_status for c in closes] == [m.FAILED]
    assert status == m.FAILED
    assert reason == (
        "round 0 has no valid pseudo-gradient: slice 0: base_sha256 '\\ud800' is not 64 "
        "lowercase hex digits; slice 1: missed the deadline of round 0"
    )
    assert tasks[1] == (m.CANCELLED, "missed the deadline of round 0")


@pytest.mark.parametrize("fault", ["raises", "unwritable reason"])
def test_a_round_that_cannot_close_fails_only_its_own_job(
    digits: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:  # fmt: skip
    """Two jobs past their round deadline; closing the first one's round raises, or writes a
    reason SQL cannot store (a lone surrogate). That job alone is rolled back and failed with
    a generic reason, its open slice withdrawn, the error logged; the other job's round
    closes in the same deadline_tx call, and the call commits."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    broken_job = _job(digits, inner_steps=5, init_seed=1)
    broken = _overdue_round(db, broken_job)
    healthy = _overdue_round(db, _job(digits, inner_steps=5))
    broken_base = tr.sha256_hex(broken_job.initial_weights())
    earlier = "lease expired on node 0xB (attempt 1)"  # slice 1's own story, kept

    def lost_once(s: Session) -> None:
        task = s.scalars(select(m.Task).where(m.Task.job_id == broken, m.Task.slice_index == 1))
        task.one().reason = earlier

    db.run_sync(lost_once)
    real = rounds.aggregate

    def aggregate(subs: list, *, base_sha256: str, **kw: object) -> rounds.RoundOutcome:
        if base_sha256 != broken_base:
            return real(subs, base_sha256=base_sha256, **kw)  # type: ignore[arg-type]
        if fault == "raises":
            raise RuntimeError("a bug while closing")
        return rounds.RoundOutcome(None, (), ((0, "\ud800"),))

    monkeypatch.setattr(rounds, "aggregate", aggregate)
    with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator.rounds"):
        closes = db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 601))
    status, reason, tasks = _job_row(db, broken)
    train_state = db.run_sync(lambda s: s.get_one(m.Job, broken).train_state)
    other = _job_row(db, healthy)
    result = db.run_sync(lambda s: s.get_one(m.Job, healthy).result)
    again = db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 602))
    db.close()
    assert sorted(c.job_status or "" for c in closes) == [m.FAILED, m.SUCCEEDED]
    assert all(c.cancel for c in closes)  # both withdrew slice 1 from its node
    assert (status, reason) == (m.FAILED, "round 0 could not be closed: internal error")
    assert tasks == [
        (m.SUCCEEDED, None),
        (m.CANCELLED, f"{earlier}; job failed: round 0 could not be closed: internal error"),
    ]
    assert train_state is None  # the failed closing's writes were rolled back
    assert other[0] == m.SUCCEEDED
    assert other[2][1] == (m.CANCELLED, "missed the deadline of round 0")
    _, metrics = tr.decode_final(result)
    assert metrics[0]["used"] == [0]
    [record] = [r for r in caplog.records if r.getMessage() == "training.round_close_failed"]
    assert record.exc_info is not None
    assert record.job_id == broken  # type: ignore[attr-defined]
    assert again == []


def test_a_result_whose_round_cannot_close_is_kept_and_fails_its_job(
    digits: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same isolation on the verifier's path: when the last result completes a round that
    raises while closing, the results stay accepted and the job fails with the generic reason."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _overdue_round(db, _job(digits, inner_steps=5))

    def boom(*_args: object, **_kw: object) -> rounds.RoundOutcome:
        raise RuntimeError("a bug while closing")

    monkeypatch.setattr(rounds, "aggregate", boom)

    def last_result(s: Session) -> str | None:
        job = s.get_one(m.Job, job_id)
        task = store.job_tasks(s, job_id)[1]
        task.status, task.result = m.SUCCEEDED, b"accepted"
        return rounds.finish_round_tx(s, job, NOW + 1)

    assert db.run_sync(last_result) == m.FAILED
    status, reason, tasks = _job_row(db, job_id)
    db.close()
    assert (status, reason) == (m.FAILED, "round 0 could not be closed: internal error")
    assert [t[0] for t in tasks] == [m.SUCCEEDED, m.SUCCEEDED]


# --- through the coordinator -----------------------------------------------------------------


def _training_nodes(running: Running, rsa_keys: list) -> list:
    nodes = [make_node(rsa_keys, i, classes=("ai.training",)) for i in range(2)]
    for node in nodes:
        running.register(node)
        running.link(node)
    return nodes


def test_training_job_runs_two_rounds_through_the_coordinator(
    coordinator: Running, rsa_keys: list, digits: tuple, runtime: TorchTrainRuntime
) -> None:
    """POST /v1/jobs with 2 slices and 2 rounds: each round dispatches one slice per node, the
    signed results close the round, and the job ends with the in-process final weights."""
    nodes = _training_nodes(coordinator, rsa_keys)
    job = _job(digits, rounds=2, inner_steps=10)
    job_id = coordinator.client.submit_job(tr.CLASS, job.encode(), slices=2)["job_id"]
    for r in range(2):
        for node in nodes:
            dispatch = node.recv()
            assert (dispatch["type"], dispatch["workload_class"]) == ("dispatch", tr.CLASS)
            assert tr.SliceRequest.decode(node.open(dispatch)).plan.round == r
            ack = node.call(node.result(dispatch, runtime.run(node.open(dispatch))))
            assert ack["status"] == "accepted", ack
    final = coordinator.wait_job(job_id, "succeeded")
    assert final["status"] == "succeeded", final
    assert [(t["round"], t["slice_index"], t["status"]) for t in final["tasks"]] == [
        (0, 0, "succeeded"), (0, 1, "succeeded"), (1, 0, "succeeded"), (1, 1, "succeeded"),
    ]  # fmt: skip
    weights, metrics = tr.decode_final(coordinator.client.job_result(job_id))
    expected, _ = _train_in_process(job, runtime, slices=2)
    assert tr.weights_container(weights) == tr.weights_container(expected)
    assert [mt["used"] for mt in metrics] == [[0, 1], [0, 1]]
    # A requester replays the rounds from the verified pseudo-gradients (verify --payload).
    client = coordinator.client
    report = audit.audit_job(
        final, client.task_result, lambda: client.raw_job_result(job_id),
        fetch_manifest=client.manifest, payload=job.encode(),
    )  # fmt: skip
    assert report.ok, report.as_json()
    assert report.result.startswith("equal to its 2 rounds replayed")
    # A job the coordinator accepted replays under a submission limit lowered since (its
    # 4 slice-rounds over a MAX_SLICE_ROUNDS of 3): the limits are the submission's.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "MAX_SLICE_ROUNDS", 3)
        report = audit.audit_job(
            final, client.task_result, lambda: client.raw_job_result(job_id),
            fetch_manifest=client.manifest, payload=job.encode(),
        )  # fmt: skip
    assert report.ok, report.as_json()
    # What the requester submitted (verify --slices) must be what the coordinator reports.
    report = audit.audit_job(
        final, client.task_result, lambda: client.raw_job_result(job_id),
        fetch_manifest=client.manifest, payload=job.encode(), submitted={"slices": 3},
    )  # fmt: skip
    assert not report.ok and report.result == "the coordinator reports slices 2, you submitted 3"
    # Weights the rounds do not give, published with a matching hash, are caught.
    forged = tr.encode_final(job.model, {k: v + 0.01 for k, v in weights.items()}, metrics)
    lied = {**final, "result_sha256": hashlib.sha256(forged).hexdigest()}
    report = audit.audit_job(
        lied, client.task_result, lambda: forged, fetch_manifest=client.manifest,
        payload=job.encode(),
    )  # fmt: skip
    assert not report.ok and "not the weights its 2 rounds replay to" in report.result
    # A coordinator that leaves a slice out of a round (its signed result published, its
    # task called cancelled) and publishes weights and metrics to match is caught at that
    # task: a verified result is never published under another status.
    shut_out = copy.deepcopy(final)
    shut_out["tasks"][1]["status"] = "cancelled"
    shut_out["tasks"][1]["reason"] = "missed the deadline of round 0"
    report = audit.audit_job(
        shut_out, client.task_result, lambda: client.raw_job_result(job_id),
        fetch_manifest=client.manifest, payload=job.encode(),
    )  # fmt: skip
    line = report.tasks[1]
    assert not report.ok and not line.ok, report.as_json()
    assert line.detail == "proof and signature verified, but the task is published as cancelled"
    # Metrics that say a slice was dropped (or used) when the replay says otherwise.
    told = copy.deepcopy(metrics)
    told[1]["used"], told[1]["dropped"] = [0], [{"slice": 1, "reason": "norm too large"}]
    forged = tr.encode_final(job.model, weights, told)
    lied = {**final, "result_sha256": hashlib.sha256(forged).hexdigest()}
    report = audit.audit_job(
        lied, client.task_result, lambda: forged, fetch_manifest=client.manifest,
        payload=job.encode(),
    )  # fmt: skip
    assert not report.ok
    assert report.result.startswith("round 1's published metrics are not the replay's: used")
    # The verified pseudo-gradients are not held for the replay (a job may keep 32 GiB of
    # them): each is fetched again, a round at a time, and must be the bytes verified (here
    # the second answer for a task differs, and the replay stops at the first).
    served: list[str] = []

    def changing(task_id: str) -> bytes:
        served.append(task_id)
        data = client.task_result(task_id)
        return data if served.count(task_id) == 1 else data[:-1] + bytes([data[-1] ^ 1])

    report = audit.audit_job(
        final, changing, lambda: client.raw_job_result(job_id),
        fetch_manifest=client.manifest, payload=job.encode(),
    )  # fmt: skip
    everyone = {t["task_id"] for t in final["tasks"]}
    assert set(served) == everyone and len(served) == len(everyone) + 1  # stops at the first
    assert not report.ok and "its result changed between two fetches" in report.result


WIDE = [
    {"type": "Linear", "in": 64, "out": 16384},
    {"type": "ReLU"},
    {"type": "Linear", "in": 16384, "out": 10},
]


def _stored_bytes(running: Running, job_id: str) -> tuple[int, list[int]]:
    """(bytes of the job's task payloads and round inputs in SQL, the rounds of its inputs)."""

    def tx(s: Session) -> tuple[int, list[int]]:
        payloads = s.scalar(
            select(func.coalesce(func.sum(func.length(m.Task.payload)), 0)).where(
                m.Task.job_id == job_id
            )
        )
        inputs = s.execute(
            select(m.RoundInput.round_index, m.RoundInput.size).where(m.RoundInput.job_id == job_id)
        ).all()
        return int(payloads or 0) + sum(size for _, size in inputs), [r for r, _ in inputs]

    return running.coord.db.run_sync(tx)


def test_a_round_stores_its_start_weights_once(
    coordinator: Running, rsa_keys: list, digits: tuple, runtime: TorchTrainRuntime
) -> None:
    """A request of a few hundred KiB may name a model of MiBs, initialised from a seed:
    the coordinator stores a round's start weights once, not once per slice (each slice
    copied them before), and puts them into each payload when it seals it to a node, which
    receives the whole slice as before. The next round is stored the same way; the job's
    end frees the weights."""
    nodes = _training_nodes(coordinator, rsa_keys)
    job = tr.JobRequest(
        tr.ModelSpec.parse(WIDE),
        tr.TrainingConfig(rounds=2, inner_steps=1, batch_size=8, inner=tr.InnerOptimizer(lr=1e-3)),
        digits[0], digits[2],
    )  # fmt: skip
    weight_bytes = 4 * sum(int(np.prod(v)) for v in job.model.parameter_shapes().values())
    assert len(job.encode()) < weight_bytes / 10  # the request is small, the model is not
    job_id = coordinator.client.submit_job(tr.CLASS, job.encode(), slices=2)["job_id"]
    stored, inputs = _stored_bytes(coordinator, job_id)
    assert stored < 1.25 * weight_bytes and inputs == [0]  # 2 copies and more before
    for r in range(2):
        for node in nodes:
            dispatch = node.recv()
            request = tr.SliceRequest.decode(node.open(dispatch))  # checks both hashes
            assert request.plan.round == r and len(request.weights) > weight_bytes
            ack = node.call(node.result(dispatch, runtime.run(node.open(dispatch))))
            assert ack["status"] == "accepted", ack
        if r == 0:
            stored, inputs = _stored_bytes(coordinator, job_id)
            assert stored < 1.25 * weight_bytes and inputs == [1]  # round 0's payloads emptied
    final = coordinator.wait_job(job_id, "succeeded")
    assert final["status"] == "succeeded", final
    assert _stored_bytes(coordinator, job_id) == (0, [])


def test_round_deadline_drops_the_late_slice(
    coordinator: Running, rsa_keys: list, digits: tuple, runtime: TorchTrainRuntime
) -> None:
    """One node answers, the other is silent: past the deadline its task is cancelled (the
    node told so), the round closes with the one slice, and a late result is refused."""
    nodes = _training_nodes(coordinator, rsa_keys)
    job = _job(digits, rounds=1, inner_steps=5, round_deadline_s=60.0)
    job_id = coordinator.client.submit_job(tr.CLASS, job.encode(), slices=2)["job_id"]
    dispatches = [node.recv() for node in nodes]
    on_time = dispatches[0]
    assert (
        nodes[0].call(nodes[0].result(on_time, runtime.run(nodes[0].open(on_time))))["status"]
        == "accepted"
    )
    assert coordinator.client.job(job_id)["status"] == "running"
    coordinator.clock.advance(61)
    final = coordinator.wait_job(job_id, "succeeded")
    assert final["status"] == "succeeded", final
    late = next(t for t in final["tasks"] if t["task_id"] == dispatches[1]["task_id"])
    assert (late["status"], late["reason"]) == ("cancelled", "missed the deadline of round 0")
    assert nodes[1].recv()["type"] == "cancel"
    ack = nodes[1].call(nodes[1].result(dispatches[1], runtime.run(nodes[1].open(dispatches[1]))))
    assert ack["status"] == "rejected"
    _, metrics = tr.decode_final(coordinator.client.job_result(job_id))
    assert metrics[0]["used"] == [dispatches[0]["slice_index"]]
    assert metrics[0]["dropped"] == [
        {"slice": late["slice_index"], "reason": "missed the deadline of round 0"}
    ]
    client = coordinator.client
    report = audit.audit_job(
        final, client.task_result, lambda: client.raw_job_result(job_id),
        fetch_manifest=client.manifest, payload=job.encode(),
    )  # fmt: skip
    assert report.ok, report.as_json()  # the replay drops the late slice too


def _other_hashes(job: tr.JobRequest, _honest: tr.PseudoGradient) -> tuple[bytes, str]:
    zeros = {k: np.zeros(s, np.float32) for k, s in job.model.parameter_shapes().items()}
    forged = tr.PseudoGradient(zeros, "c" * 64, "d" * 64, 999, 2.0, 1.0).encode()
    return forged, f"ai.training result: computed from weights '{'c' * 64}'"


def _over_max_norm(job: tr.JobRequest, honest: tr.PseudoGradient) -> tuple[bytes, str]:
    deltas = {k: v * np.float32(1e9) for k, v in honest.deltas.items()}  # finite, huge
    forged = tr.PseudoGradient(deltas, honest.base_sha256, honest.shard_sha256, honest.steps,
                               honest.first_loss, honest.last_loss).encode()  # fmt: skip
    return forged, "ai.training result: norm "


@pytest.mark.parametrize("forge", [_other_hashes, _over_max_norm])
def test_a_forged_result_is_refused_on_arrival_and_its_slice_retried_elsewhere(
    start_coordinator: Callable[..., Running], rsa_keys: list, digits: tuple,
    runtime: TorchTrainRuntime,
    forge: Callable[[tr.JobRequest, tr.PseudoGradient], tuple[bytes, str]],
) -> None:  # fmt: skip
    """A node answers its slice with all zeros, other weights and shard hashes and 999
    steps; or with its real update scaled past the job's max_norm (finite: before, that
    passed on arrival, was accepted, and was dropped only at the round's close, so the
    slice never ran again and its node kept an accepted result). The result is rejected
    with the reason and nothing of it is stored; its lease ends there and the slice goes
    to the honest node at once, whose result the round uses."""
    running = start_coordinator(heartbeat_interval=1000.0)  # nobody goes offline here
    forger, honest = _training_nodes(running, rsa_keys)
    job = _job(digits, rounds=1, inner_steps=5)
    job_id = running.client.submit_job(tr.CLASS, job.encode(), slices=2)["job_id"]
    mine, theirs = forger.recv(), honest.recv()
    real = tr.PseudoGradient.decode(
        runtime.run(forger.open(mine)), shapes=job.model.parameter_shapes(), grad_dtype="F32"
    )
    forged, reason = forge(job, real)
    ack = forger.call(forger.result(mine, forged))
    assert ack["status"] == "rejected"
    assert ack["reason"].startswith(reason), ack["reason"]
    ack = honest.call(honest.result(theirs, runtime.run(honest.open(theirs))))
    assert ack["status"] == "accepted"
    assert running.client.job(job_id)["status"] == "running"  # the round waits for the slice
    again = honest.recv()
    assert (again["type"], again["task_id"]) == ("dispatch", mine["task_id"])
    now = int(running.clock.now())
    ack = honest.call(honest.result(again, runtime.run(honest.open(again, now=now))))
    assert ack["status"] == "accepted"
    final = running.wait_job(job_id, "succeeded")
    assert final["status"] == "succeeded", final
    assert [(t["status"], t["node_id"]) for t in final["tasks"]] == [
        ("succeeded", honest.node_id)
    ] * 2
    weights, metrics = tr.decode_final(running.client.job_result(job_id))
    assert (metrics[0]["used"], metrics[0]["dropped"]) == ([0, 1], [])
    expected, _ = _train_in_process(job, runtime, slices=2)
    assert tr.weights_container(weights) == tr.weights_container(expected)


@pytest.mark.parametrize("total_rounds", [2, 1])
def test_a_slice_that_fails_everywhere_is_dropped_not_the_job(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path, total_rounds: int
) -> None:
    """Slice 1 completes; slice 0 is refused by node after node until its attempts run out.
    The job does not fail: slice 0 is dropped from the round, as a late slice is, and the
    round closes at once with slice 1 alone; the next round asks for both again, or, after
    the last round, the job succeeds, and the lost lease says so (job.succeeded is logged)."""
    from nodeclient.coordinator.leases import requeue_or_fail

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _insert(db, _job(digits, rounds=total_rounds, inner_steps=5), 2)

    def tx(s: Session) -> tuple[str | None, int]:
        job = s.get_one(m.Job, job_id)
        tasks = {t.slice_index: t for t in s.scalars(select(m.Task).where(m.Task.job_id == job_id))}
        tasks[1].status, tasks[1].result = m.SUCCEEDED, runtime.run(_sent(s, tasks[1]))
        assert rounds.finish_round_tx(s, job, NOW) is None  # slice 0 still open
        failing = tasks[0]
        failing.status, failing.node_id, failing.attempts = m.LEASED, "0x" + "ab" * 20, 3
        lost = requeue_or_fail(
            s, failing, outcome="rejected", detail="node 0xab.. rejected it: out of memory",
            now=NOW, max_attempts=3,
        )  # fmt: skip
        assert lost.failed and failing.status == m.FAILED
        assert lost.job == (None if total_rounds == 2 else (job_id, m.SUCCEEDED))
        return job.status, job.round_index

    status, round_index = db.run_sync(tx)
    metrics = db.run_sync(lambda s: rounds.round_metrics(s, job_id))
    db.close()
    if total_rounds == 2:
        assert status in (m.QUEUED, m.RUNNING) and round_index == 1  # not failed: round 1
    else:
        assert status == m.SUCCEEDED
    (first,) = metrics
    assert first["used"] == [1]
    assert [d["slice"] for d in first["dropped"]] == [0]
    assert "out of memory; gave up after 3 of 3 attempts" in first["dropped"][0]["reason"]


def test_a_closed_rounds_payloads_are_emptied_and_its_results_kept(
    digits: tuple, runtime: TorchTrainRuntime, tmp_path: Path
) -> None:
    """Each round's payloads carry the weights and a shard; once the round has closed and
    the next is built from them, nothing reads them: they are emptied, so a long job does
    not keep every round's copy. The results, which the proofs cover, stay."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    job_id = _insert(db, _job(digits, rounds=3, inner_steps=5), 2)
    _complete_round(db, job_id, runtime)
    _complete_round(db, job_id, runtime)
    rows = db.run_sync(
        lambda s: s.execute(
            select(m.Task.round_index, func.length(m.Task.payload), func.length(m.Task.result))
            .where(m.Task.job_id == job_id)
            .order_by(m.Task.round_index, m.Task.slice_index)
        ).all()
    )
    db.close()
    assert [(r, size == 0) for r, size, _ in rows] == [
        (0, True), (0, True), (1, True), (1, True), (2, False), (2, False)
    ]  # fmt: skip
    assert all(result for r, _, result in rows if r < 2)  # the results stay


def test_a_job_ended_by_a_round_deadline_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A round closed at its deadline may end its job (the last round, or no valid slice):
    job.succeeded / job.failed is logged with the job's id, as when a result ends it."""
    from types import SimpleNamespace

    woken: list[bool] = []
    coord = SimpleNamespace(send_cancel=lambda *a: None, wake=lambda: woken.append(True))
    closes = [rounds.RoundClose(m.SUCCEEDED, (), "job-1"), rounds.RoundClose(None, ())]
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.rounds"):
        rounds.report_closes(coord, closes)  # type: ignore[arg-type]
    ended = [(r.getMessage(), r.job_id) for r in caplog.records]  # type: ignore[attr-defined]
    assert ended == [("job.succeeded", "job-1")] and woken == [True]


def _two_slice_round(
    db: Database, digits: tuple, *, round_deadline_s: float
) -> tuple[str, Candidate]:
    """A one-round training job of 2 slices, queued at NOW, and a node that takes both."""
    job = _job(digits, rounds=1, inner_steps=2, round_deadline_s=round_deadline_s)
    payload = job.encode()
    meta, parts = tr.job_meta(payload, len(payload)), tr.split(payload, 2)
    job_id = db.run_sync(
        lambda s: store.insert_job(
            s, workload_class=tr.CLASS, payloads=parts, min_tier=0, region=None, meta=meta,
            now=NOW,
        )
    )  # fmt: skip
    return job_id, Candidate("0x" + "ab" * 20, 4, "eu-west", frozenset({tr.CLASS}), 2)


@pytest.mark.parametrize("clock_read_first", [False, True])
def test_a_dispatch_that_never_left_does_not_start_the_round_clock(
    db: Database, digits: tuple, clock_read_first: bool
) -> None:
    """Every lease of a round is undone because its node's link was gone (no attempt
    spent): the round's deadline does not run while its slices wait in the queue, even
    when a tick read the round's first lease before the undo committed. Before, the
    round closed at the deadline with every slice "missed" and the job failed."""
    from nodeclient.coordinator.leases import undeliverable_tx
    from nodeclient.coordinator.placement import assign_tx

    job_id, node = _two_slice_round(db, digits, round_deadline_s=60.0)
    assigned = db.run_sync(lambda s: assign_tx(s, [node], now=NOW, lease_seconds=300))
    assert len(assigned) == 2
    if clock_read_first:
        db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW))
        assert db.run_sync(lambda s: s.get_one(m.Job, job_id).round_deadline) == NOW + 60

    def undo(s: Session) -> None:
        for a in assigned:
            undeliverable_tx(s, a.task_id, a.node_id, NOW, attempt=a.attempt)

    db.run_sync(undo)
    tasks = db.run_sync(lambda s: list(s.scalars(select(m.Task))))
    assert [(t.status, t.leased_at, t.attempts) for t in tasks] == [(m.QUEUED, None, 0)] * 2
    for later in (1, 61, 3600):
        assert db.run_sync(lambda s, t=later: rounds.deadline_tx(s, now=NOW + t)) == []
    job_row = db.run_sync(lambda s: s.get_one(m.Job, job_id))
    assert (job_row.status, job_row.round_deadline) == (m.RUNNING, None)
    # Leased again and delivered at +4000: the clock starts there.
    again = db.run_sync(lambda s: assign_tx(s, [node], now=NOW + 4000, lease_seconds=300))
    assert len(again) == 2
    db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 4000))
    assert db.run_sync(lambda s: s.get_one(m.Job, job_id).round_deadline) == NOW + 4060


def test_a_re_lease_does_not_move_the_round_clock_back(db: Database, digits: tuple) -> None:
    """The round's deadline runs from its first delivered lease. A slice leased again
    (its lease expired), then a dispatch that never left: the deadline, recomputed after
    the undo, still counts from the first lease, not from the re-lease. Before, it moved
    to the latest lease's time plus the round's deadline."""
    from nodeclient.coordinator.leases import expire_tx, undeliverable_tx
    from nodeclient.coordinator.placement import assign_tx

    job_id, node = _two_slice_round(db, digits, round_deadline_s=600.0)
    assert len(db.run_sync(lambda s: assign_tx(s, [node], now=NOW, lease_seconds=300))) == 2
    db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 1))
    assert db.run_sync(lambda s: s.get_one(m.Job, job_id).round_deadline) == NOW + 600

    def lose_both(s: Session) -> None:  # their node went away: the leases run out early
        for task in s.scalars(select(m.Task)):
            task.lease_deadline = NOW + 300

    db.run_sync(lose_both)
    db.run_sync(lambda s: expire_tx(s, now=NOW + 301, max_attempts=3))  # both lost
    again = db.run_sync(lambda s: assign_tx(s, [node], now=NOW + 302, lease_seconds=300))
    assert len(again) == 2

    def lose_slice_one(s: Session) -> None:  # its node went away: the lease runs out early
        task = s.scalars(select(m.Task).where(m.Task.slice_index == 1)).one()
        task.lease_deadline = NOW + 400

    db.run_sync(lose_slice_one)
    db.run_sync(lambda s: expire_tx(s, now=NOW + 401, max_attempts=3))
    third = db.run_sync(lambda s: assign_tx(s, [node], now=NOW + 402, lease_seconds=300))
    assert [a.attempt for a in third] == [3]

    def undo(s: Session) -> None:
        for a in third:
            undeliverable_tx(s, a.task_id, a.node_id, NOW + 402, attempt=a.attempt)

    db.run_sync(undo)
    assert db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 450)) == []
    assert db.run_sync(lambda s: s.get_one(m.Job, job_id).round_deadline) == NOW + 600
    assert len(db.run_sync(lambda s: rounds.deadline_tx(s, now=NOW + 601))) == 1
    assert db.run_sync(lambda s: s.get_one(m.Job, job_id).status) != m.RUNNING


def test_a_stub_whose_round_weights_are_gone_fails_its_job_and_withdraws_its_leases(
    db: Database, digits: tuple
) -> None:
    """A damaged database: a slice stub whose round input is missing cannot be made into
    the payload a node needs. Its job fails with the reason, nothing is dispatched for it,
    and the leases of the job's other slices are handed back for cancelling on their
    nodes, rather than the nodes receiving a stub they would refuse one by one."""
    from nodeclient.coordinator.placement import assign_tx

    job_id = _insert(db, _job(digits, rounds=1, inner_steps=2), 2)
    node = Candidate("0x" + "ab" * 20, 4, "eu-west", frozenset({tr.CLASS}), 1)  # one slot
    first = db.run_sync(lambda s: assign_tx(s, [node], now=NOW, lease_seconds=300.0))
    assert len(first) == 1  # one slice leased and sent, the other queued
    db.run_sync(lambda s: s.execute(m.RoundInput.__table__.delete()))  # the damage
    other = Candidate("0x" + "cd" * 20, 4, "eu-west", frozenset({tr.CLASS}), 1)
    withdrawn: list[tuple[str, str]] = []
    sent = db.run_sync(
        lambda s: assign_tx(s, [node, other], now=NOW, lease_seconds=300.0, withdrawn=withdrawn)
    )
    status, reason, _ = _job_row(db, job_id)
    assert sent == [] and status == m.FAILED
    assert "cannot be sent" in (reason or "") and "the round's are" in (reason or "")
    assert withdrawn == [(node.node_id, first[0].task_id)]


def test_a_slice_is_leased_until_its_round_deadline(coordinator: Running, rsa_keys: list,
                                                     digits: tuple) -> None:  # fmt: skip
    """A training slice may run until its round's deadline: its lease lasts that and a
    grace more, not the coordinator's 300 s, after which every node in turn would be cut
    off in the middle of a long slice."""
    from nodeclient.coordinator.placement import LEASE_GRACE_S

    nodes = _training_nodes(coordinator, rsa_keys)
    now = coordinator.clock.now()
    job = _job(digits, rounds=1, inner_steps=2, round_deadline_s=1800.0)
    coordinator.client.submit_job(tr.CLASS, job.encode(), slices=2)
    for node in nodes:
        assert node.recv()["lease_expires_at"] == int(now + 1800 + LEASE_GRACE_S)
