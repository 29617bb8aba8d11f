"""The ai.training formats: model spec allowlist, config, job, slice, pseudo-gradient (2.3.5)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads import training as tr
from nodeclient.workloads import training_containers as trc
from nodeclient.workloads import training_results as trr
from nodeclient.workloads import training_spec as trs
from nodeclient.workloads.tensors import decode_tensors, encode_tensors

MLP = [
    {"type": "Linear", "in": 4, "out": 3},
    {"type": "ReLU"},
    {"type": "Linear", "in": 3, "out": 2},
]


def _job(**config: object) -> tr.JobRequest:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = (np.arange(10) % 2).astype(np.int64)
    return tr.JobRequest(tr.ModelSpec.parse(MLP), tr.TrainingConfig(**config), x, y)  # type: ignore[arg-type]


def test_parameter_names_follow_torch_sequential_naming() -> None:
    """Names are nn.Sequential's state-dict keys, nested Sequentials included, with shapes."""
    spec = tr.ModelSpec.parse(
        [
            {"type": "Flatten"},
            {
                "type": "Sequential",
                "layers": [{"type": "Linear", "in": 6, "out": 4}, {"type": "GELU"}],
            },
            {"type": "LayerNorm", "dim": 4},
            {"type": "Dropout", "p": 0},
            {"type": "Linear", "in": 4, "out": 3, "bias": False},
        ]
    )
    assert spec.parameter_shapes() == {
        "1.0.weight": (4, 6),
        "1.0.bias": (4,),
        "2.weight": (4,),
        "2.bias": (4,),
        "4.weight": (3, 4),
    }
    assert spec.output_shape((2, 3)) == (3,)


def _nested(depth: int) -> list:
    layers: list = [{"type": "ReLU"}]
    for _ in range(depth - 1):
        layers = [{"type": "Sequential", "layers": layers}]
    return layers


@pytest.mark.parametrize(
    ("layers", "reason"),
    [
        ([{"type": "Lambda", "code": "import os"}], "not allowed"),
        ([{"type": "Conv2d"}], "not allowed"),
        ([{"type": "Linear", "in": 4, "out": 2, "init": "x"}], "unknown keys"),
        ([{"type": "Dropout", "p": 0.5}], "p=0"),
        ([{"type": "Linear", "in": True, "out": 2}], "integer"),
        ([], "non-empty"),
        (_nested(5), "deeper"),
    ],
)
def test_model_spec_allowlist_refuses_anything_else(layers: list, reason: str) -> None:
    """Only allowlisted layer types with known keys are accepted: a spec is data, not code."""
    with pytest.raises(LocalProtocolError, match=reason):
        tr.ModelSpec.parse(layers)


def test_output_shape_names_the_mismatched_layer() -> None:
    """A dataset whose features do not fit the first Linear is refused with the layer's path."""
    with pytest.raises(LocalProtocolError, match=r"layer 0 \(Linear\) expects last dimension 4"):
        tr.ModelSpec.parse(MLP).output_shape((5,))


def test_init_weights_are_deterministic_and_within_torch_bounds() -> None:
    """The same seed gives the same weights; Linear values lie within 1/sqrt(fan_in)."""
    spec = tr.ModelSpec.parse(MLP)
    a, b, c = spec.init_weights(7), spec.init_weights(7), spec.init_weights(8)
    assert tr.weights_container(a) == tr.weights_container(b) != tr.weights_container(c)
    assert np.abs(a["0.weight"]).max() <= 0.5
    assert a["0.weight"].dtype == np.float32


def test_config_defaults_are_diloco() -> None:
    """Defaults: AdamW inside, SGD with Nesterov momentum 0.9 and lr 0.7 outside."""
    config = tr.TrainingConfig()
    assert (config.inner.name, config.outer.lr, config.outer.momentum, config.outer.nesterov) == (
        "adamw", 0.7, 0.9, True,
    )  # fmt: skip
    assert tr.TrainingConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": True}, "int"),
        ({"inner_steps": "5"}, "int"),
        ({"shuffle": True}, "unknown keys"),
        ({"inner": {"name": "lbfgs"}}, "adamw"),
        ({"outer": {"nesterov": 1}}, "bool"),
        ({"grad_dtype": "BF16"}, "grad_dtype"),
        ({"inner": {"betas": [0.9]}}, "array of 2"),
    ],
)
def test_config_refuses_bad_values(raw: dict, reason: str) -> None:
    """Unknown keys, wrong JSON types and out-of-range values are refused by name."""
    with pytest.raises(LocalProtocolError, match=reason):
        tr.TrainingConfig.from_dict(raw)


def test_job_round_trip_and_refusals() -> None:
    """A job encodes and decodes; labels outside the model's outputs are refused."""
    job = _job(rounds=3)
    again = tr.JobRequest.decode(job.encode())
    assert again.config.rounds == 3
    assert again.model.to_json() == job.model.to_json()
    bad = tr.JobRequest(job.model, job.config, job.x, job.y + 5)
    with pytest.raises(RemoteProtocolError, match="labels must lie in"):
        tr.JobRequest.decode(bad.encode())


def test_shards_partition_the_data_deterministically() -> None:
    """Shards are disjoint, cover every row once, differ by at most one row, and repeat."""
    job = _job(data_seed=3)
    shards = job.shards(3)
    assert shards == job.shards(3)
    rows = [decode_tensors(s)[0] for s in shards]
    assert sorted(len(r["y"]) for r in rows) == [3, 3, 4]
    joined = np.concatenate([r["x"] for r in rows])
    assert sorted(map(tuple, joined.tolist())) == sorted(map(tuple, job.x.tolist()))
    with pytest.raises(RemoteProtocolError, match="slices must be in"):
        job.shards(11)


def test_weights_container_is_plain_safetensors() -> None:
    """Weights travel as safetensors: the reference reader opens them."""
    weights = tr.ModelSpec.parse(MLP).init_weights(0)
    loaded = st_load(tr.weights_container(weights))
    assert sorted(loaded) == sorted(weights)
    assert np.array_equal(loaded["2.bias"], weights["2.bias"])


def test_slice_payload_carries_and_checks_both_hashes() -> None:
    """Round 0 payloads name weights and shard by SHA-256, and decode verifies them."""
    payload = _job(inner_steps=7).round_zero(2)[1]
    request = tr.SliceRequest.decode(payload)
    assert request.weights_sha256 == hashlib.sha256(request.weights).hexdigest()
    assert (request.plan.round, request.plan.slice, request.plan.steps) == (0, 1, 7)
    assert request.plan.seed == trs.slice_seed(0, 0, 1)
    tensors, meta = decode_tensors(payload)
    other_shard = trc.shard_container(np.zeros((1, 4), np.float32), np.zeros(1, np.int64))
    forged = encode_tensors(
        {"weights": tensors["weights"], "shard": np.frombuffer(other_shard, np.uint8)},
        metadata=meta,
    )
    with pytest.raises(RemoteProtocolError, match="shard has sha256"):
        tr.SliceRequest.decode(forged)


def test_a_stored_slice_expands_to_the_very_payload_a_node_receives() -> None:
    """The coordinator stores a round's weights once and a stub per slice: each stub with
    those weights gives, byte for byte, the slice payload round_zero builds, which a node
    decodes and checks as before. A stub never passes for a slice, and a stub with other
    weights than the ones it names is refused."""
    job = _job(inner_steps=7)
    whole = job.round_zero(3)
    weights, stubs = job.round_zero_stored(3)
    digest = hashlib.sha256(weights).hexdigest()
    assert [tr.expand(stub, weights, digest) for stub in stubs] == whole
    assert all(
        len(stub) < len(w) - len(weights) + 1024 for stub, w in zip(stubs, whole, strict=True)
    )
    assert tr.expand(whole[0], b"", "") == whole[0]  # a whole slice, as stored before stubs
    assert tr.stored_slice(stubs[1]) == tr.stored_slice(whole[1])
    request = tr.SliceRequest.decode(whole[1])
    assert tr.stored_slice(stubs[1]) == (digest, request.shard_sha256, request.shard)
    with pytest.raises(RemoteProtocolError, match="'slice-stub', expected"):
        tr.SliceRequest.decode(stubs[0])
    with pytest.raises(RemoteProtocolError, match="the round's are"):
        tr.expand(stubs[0], weights, "e" * 64)
    tr.check_slice(_answer(whole[2]), stubs[2], 1 << 20)  # what a stored task holds
    with pytest.raises(RemoteProtocolError, match="computed on shard"):
        tr.check_slice(_answer(whole[2]), stubs[1], 1 << 20)


def test_pseudo_gradient_round_trip_and_structure_checks() -> None:
    """Results decode to what was encoded, bytes are canonical, and shapes and dtype are enforced."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    pg = tr.PseudoGradient(deltas, "a" * 64, "b" * 64, 5, 2.25, 0.125)
    data = pg.encode()
    assert (
        data
        == tr.PseudoGradient(
            dict(reversed(deltas.items())), "a" * 64, "b" * 64, 5, 2.25, 0.125
        ).encode()
    )
    back = tr.PseudoGradient.decode(data, shapes=shapes, grad_dtype="F32")
    assert (back.steps, back.first_loss, back.last_loss) == (5, 2.25, 0.125)
    with pytest.raises(RemoteProtocolError, match="expected"):
        tr.PseudoGradient.decode(data, shapes=shapes, grad_dtype="F16")
    wrong = {**deltas, "0.weight": np.zeros((3, 5), np.float32)}
    with pytest.raises(RemoteProtocolError, match="has shape"):
        tr.PseudoGradient.decode(
            tr.PseudoGradient(wrong, "a" * 64, "b" * 64, 5, 1.0, 1.0).encode(),
            shapes=shapes,
            grad_dtype="F32",
        )


def test_final_result_round_trip() -> None:
    """The job result carries the final weights and the per-round metrics."""
    weights = tr.ModelSpec.parse(MLP).init_weights(1)
    final = tr.encode_final(tr.ModelSpec.parse(MLP), weights, [{"round": 0, "used": [0, 1]}])
    back, metrics = tr.decode_final(final)
    assert metrics == [{"round": 0, "used": [0, 1]}]
    assert np.array_equal(back["0.weight"], weights["0.weight"])


def test_final_result_of_a_long_job_decodes() -> None:
    """10,000 rounds of 10 slices: the metrics are megabytes, over the 64 KiB bound for a
    requester's own JSON and the 1 MiB default header limit; the final still decodes."""
    weights = tr.ModelSpec.parse(MLP).init_weights(1)
    norms = {str(i): 1.0 + i / 7 for i in range(10)}
    metrics = [
        {"round": r, "used": list(range(10)), "norms": norms, "first_loss": 2.3, "last_loss": 1.1}
        for r in range(10_000)
    ]
    final = tr.encode_final(tr.ModelSpec.parse(MLP), weights, metrics)
    assert len(final) > 2 << 20
    back, decoded = tr.decode_final(final)
    assert np.array_equal(back["0.weight"], weights["0.weight"])
    assert decoded == metrics
    with pytest.raises(RemoteProtocolError, match="over the limit of 1048576"):
        tr.decode_final(final, max_bytes=1 << 20)  # the caller's bound still holds


def test_rounds_times_slices_is_bounded_at_submission() -> None:
    """The result keeps a metrics entry per slice and round, the job's JSON one per task: a
    job past MAX_SLICE_ROUNDS is refused before anything is built, saying what to change."""
    x, y = np.zeros((20, 4), np.float32), (np.arange(20) % 2).astype(np.int64)
    job = tr.JobRequest(tr.ModelSpec.parse(MLP), tr.TrainingConfig(rounds=5_000), x, y)
    assert len(job.round_zero(2)) == 2  # 10,000: at the bound
    with pytest.raises(RemoteProtocolError, match="15000 slice-rounds, over 10000.*fewer"):
        tr.split(job.encode(), 3)


@pytest.mark.parametrize("grad_dtype", ["F32", "F16"])
def test_the_results_a_job_keeps_are_bounded_at_submission(
    grad_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every round's pseudo-gradients stay with the job, so rounds x slices x one update's
    bytes is held to MAX_STORED_BYTES when the job arrives (before, a job could ask the
    coordinator to keep terabytes), saying what to change; F16 updates count half."""
    x, y = np.zeros((20, 4), np.float32), (np.arange(20) % 2).astype(np.int64)
    spec = tr.ModelSpec.parse(MLP)
    count = sum(int(np.prod(s)) for s in spec.parameter_shapes().values())
    each = count * (2 if grad_dtype == "F16" else 4)
    monkeypatch.setattr(tr, "MAX_STORED_BYTES", 10 * 4 * each)  # 10 rounds of 4 slices
    job = tr.JobRequest(spec, tr.TrainingConfig(rounds=10, grad_dtype=grad_dtype), x, y)
    assert len(tr.split(job.encode(), 4)) == 4  # at the bound
    with pytest.raises(RemoteProtocolError, match=r"would keep \d+ bytes of pseudo-grad.*fewer"):
        tr.split(job.encode(), 5)


def _with_metadata(key: str, json_value: bytes) -> bytes:
    """A pseudo-gradient whose metadata *key* holds *json_value* (raw JSON, any escape).

    encode_tensors refuses strings that are not valid Unicode, so a 6-character
    placeholder is written and its bytes swapped for a 6-byte JSON escape, which keeps
    the header length and every offset as they were.
    """
    assert len(json_value) == 6
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    values = {"base_sha256": "a" * 64, "shard_sha256": "b" * 64, key: "QQQQQQ"}
    data = tr.PseudoGradient(deltas, values["base_sha256"], values["shard_sha256"], 5, 2.0,
                             1.0).encode()  # fmt: skip
    assert data.count(b'"QQQQQQ"') == 1
    return data.replace(b'"QQQQQQ"', b'"' + json_value + b'"')


@pytest.mark.parametrize("key", ["base_sha256", "shard_sha256"])
@pytest.mark.parametrize("json_value", [rb"\ud800", rb"\u0000", b"abcdef"])
def test_pseudo_gradient_hashes_must_be_hexdigests(key: str, json_value: bytes) -> None:
    """A lone surrogate, a NUL or any non-hexdigest in a hash is refused when the result is
    checked, with a reason that stays ASCII (it is stored in SQL text columns)."""
    data = _with_metadata(key, json_value)
    meta = {"model": tr.ModelSpec.parse(MLP).to_json(), "config": tr.TrainingConfig().to_dict()}
    with pytest.raises(RemoteProtocolError, match=f"{key} .* is not 64 lowercase hex") as info:
        tr.check_result(data, meta, len(data))
    assert str(info.value).isascii()


@pytest.mark.parametrize("value", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 63 + "\n"])
def test_pseudo_gradient_hashes_are_exactly_64_lowercase_hex(value: str) -> None:
    """Upper case, a digit short or over, a non-hex letter, a trailing newline: all refused."""
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    data = tr.PseudoGradient(deltas, "a" * 64, value, 5, 2.0, 1.0).encode()
    with pytest.raises(RemoteProtocolError, match="shard_sha256 .* is not 64 lowercase hex"):
        tr.PseudoGradient.decode(data, shapes=shapes, grad_dtype="F32")


def test_a_split_whose_slices_would_not_fit_is_refused_before_it_is_built() -> None:
    """Every slice carries the whole model's weights: a 65M-parameter model (248 MiB of
    F32) split 4096 ways would be about 1 TB of slice payloads. Refused at once, by
    arithmetic, without building the weights."""
    spec = tr.ModelSpec.parse(
        [{"type": "Linear", "in": 1, "out": 1 << 20}, {"type": "Linear", "in": 1 << 20, "out": 60}]
    )
    x = np.zeros((4096, 1), np.float32)
    y = (np.arange(4096) % 60).astype(np.int64)
    job = tr.JobRequest(spec, tr.TrainingConfig(), x, y)
    with pytest.raises(RemoteProtocolError, match=r"\(33554432 less room for headers\)"):
        tr.split(job.encode(), 4096)
    small = _job()
    with pytest.raises(RemoteProtocolError, match="per round together"):
        _with_limits(small, slice_bytes=1 << 20, split_bytes=100)
    assert len(_with_limits(small, slice_bytes=1 << 20, split_bytes=1 << 20)) == 2


@pytest.mark.parametrize(("out", "fits"), [(8149, True), (8214, False)])
def test_a_slice_and_its_result_fit_a_task_payload_with_their_headers(out: int, fits: bool) -> None:
    """A model whose weights and shard come within a few hundred KiB of MAX_SLICE_BYTES:
    its slice payload and an honest result would each be over the limit, once their
    headers are added, so every node's result would be refused after the work was done.
    Refused at submission instead; one that is accepted fits, headers included."""
    spec = tr.ModelSpec.parse(
        [{"type": "Linear", "in": 1, "out": 1020}, {"type": "ReLU"},
         {"type": "Linear", "in": 1020, "out": out}]
    )  # fmt: skip
    job = tr.JobRequest(spec, tr.TrainingConfig(inner_steps=1), np.zeros((2, 1), np.float32),
                        np.array([0, 1], np.int64))  # fmt: skip
    if not fits:
        with pytest.raises(RemoteProtocolError, match="less room for headers"):
            job.round_zero(1)
        return
    [payload] = job.round_zero(1)
    assert len(payload) <= tr.MAX_SLICE_BYTES
    request = tr.SliceRequest.decode(payload, max_bytes=len(payload))
    deltas = {k: np.full(s, 1e-3, np.float32) for k, s in spec.parameter_shapes().items()}
    result = tr.PseudoGradient(deltas, request.weights_sha256, request.shard_sha256, 1, 0.7,
                               0.6).encode()  # fmt: skip
    assert len(result) <= tr.MAX_SLICE_BYTES
    tr.check_slice(result, payload, tr.MAX_SLICE_BYTES)


def _with_limits(job: tr.JobRequest, *, slice_bytes: int, split_bytes: int) -> list[bytes]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "MAX_SLICE_BYTES", slice_bytes)
        mp.setattr(tr, "MAX_SPLIT_BYTES", split_bytes)
        return job.round_zero(2)


def test_numbers_and_json_that_break_a_parser_are_protocol_errors(
    stock_recursion_limit: None,
) -> None:
    with pytest.raises(RemoteProtocolError, match="nests too deeply"):
        trs.load_json("[" * 60_000, what="metrics")
    with pytest.raises(RemoteProtocolError, match="not a number"):
        trr._parse_loss("[" * 100_000, "first_loss")
    with pytest.raises(RemoteProtocolError, match="beyond a float32 loss"):
        trr._parse_loss("1.7e308", "first_loss")
    assert trr._parse_loss("nan", "first_loss") != trr._parse_loss("nan", "first_loss")
    with pytest.raises(LocalProtocolError, match="lr"):
        trs._float(10**400, "lr", 0.0, 10.0)


def test_a_model_with_no_parameters_is_refused() -> None:
    """Nothing to train: the inner optimizer would refuse it on every node, each time
    counted against the node."""
    with pytest.raises(LocalProtocolError, match="no parameters"):
        tr.ModelSpec.parse([{"type": "ReLU"}])


def _answer(payload: bytes, **change: object) -> bytes:
    """A well-formed result for the slice *payload*, with the fields in *change* replaced."""
    request = tr.SliceRequest.decode(payload)
    shapes = request.model.parameter_shapes()
    fields: dict[str, object] = {
        "deltas": {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()},
        "base_sha256": request.weights_sha256, "shard_sha256": request.shard_sha256,
        "steps": request.plan.steps, "first_loss": 0.75, "last_loss": 0.5,
    }  # fmt: skip
    fields.update(change)
    return tr.PseudoGradient(**fields).encode()  # type: ignore[arg-type]


def _zeros(value: float = 0.0) -> dict[str, np.ndarray]:
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    deltas = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    deltas["0.weight"][0, 0] = value
    return deltas


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"deltas": _zeros(), "base_sha256": "c" * 64, "shard_sha256": "d" * 64, "steps": 999},
            f"computed from weights '{'c' * 64}', but the slice's are ",
        ),
        ({"base_sha256": "c" * 64}, f"computed from weights '{'c' * 64}'"),
        ({"shard_sha256": "d" * 64}, f"computed on shard '{'d' * 64}'"),
        ({"steps": 999}, "ran 999 steps, the slice asks for 7"),
        ({"deltas": _zeros()}, "all zeros"),
    ],
    ids=["forged", "base", "shard", "steps", "zeros"],
)
def test_a_result_is_held_to_its_own_task(change: dict, reason: str) -> None:
    """check_slice, run when a result arrives: a pseudo-gradient must name its own task's
    weights and shard, have run its steps, and not be all zeros; the forgery of all zeros
    with wrong hashes and 999 steps is refused at its first fault."""
    payload = _job(inner_steps=7).round_zero(2)[1]
    tr.check_slice(_answer(payload), payload, 1 << 20)
    with pytest.raises(RemoteProtocolError, match=re.escape(reason)):
        tr.check_slice(_answer(payload, **change), payload, 1 << 20)


@pytest.mark.parametrize(
    "change",
    [{"last_loss": float("nan")}, {"deltas": _zeros(np.inf)}, {"deltas": _zeros(np.nan)}],
    ids=["loss", "inf", "nan"],
)
def test_a_non_finite_result_is_refused_on_arrival(change: dict) -> None:
    """NaN or infinity, in a loss or a value, costs a node nothing to send: refused when it
    arrives (check_slice), as all zeros is, so that its node holds no accepted result for
    it and the slice goes to another node; the round's close would refuse it too."""
    payload = _job(inner_steps=7).round_zero(2)[1]
    result = _answer(payload, **change)
    with pytest.raises(RemoteProtocolError, match="not finite|NaN or infinity"):
        tr.check_slice(result, payload, 1 << 20)
    request = tr.SliceRequest.decode(payload)
    pg = tr.PseudoGradient.decode(
        result, shapes=request.model.parameter_shapes(), grad_dtype=request.plan.grad_dtype
    )
    with pytest.raises(RemoteProtocolError, match="not finite|NaN or infinity"):
        tr.check_pseudo_gradient(
            pg, base_sha256=request.weights_sha256, shard_sha256=request.shard_sha256,
            steps=request.plan.steps,
        )  # fmt: skip


def test_a_result_for_the_other_slice_is_refused() -> None:
    """A valid result of slice 0 does not answer slice 1 (another shard), nor does a result
    of round 0 answer round 1 (other weights): each names what it was computed on."""
    job = _job(inner_steps=7)
    first, second = job.round_zero(2)
    with pytest.raises(RemoteProtocolError, match="computed on shard"):
        tr.check_slice(_answer(first), second, 1 << 20)
    request = tr.SliceRequest.decode(second)
    weights = {k: v + 1 for k, v in tr.decode_weights(request.weights, request.model).items()}
    next_round = tr.SliceRequest(
        request.model, tr.weights_container(weights), request.shard,
        tr.plan_for(job.config, 1, 1),
    ).encode()  # fmt: skip
    with pytest.raises(RemoteProtocolError, match="computed from weights"):
        tr.check_slice(_answer(second), next_round, 1 << 20)
    tr.check_slice(_answer(next_round), next_round, 1 << 20)


def test_an_f16_result_is_checked_after_widening() -> None:
    """With grad_dtype F16 the values are checked as the round's close reads them: a value
    too small for F16, which rounds to zero everywhere, is an all-zero forgery on arrival."""
    payload = _job(inner_steps=7, grad_dtype="F16").round_zero(2)[0]
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    good = {k: np.full(s, 0.01, np.float16) for k, s in shapes.items()}
    tr.check_slice(_answer(payload, deltas=good), payload, 1 << 20)
    zero = {k: np.full(s, 1e-9, np.float32).astype(np.float16) for k, s in shapes.items()}
    with pytest.raises(RemoteProtocolError, match="all zeros"):
        tr.check_slice(_answer(payload, deltas=zero), payload, 1 << 20)


def test_a_norm_over_max_norm_is_refused_on_arrival() -> None:
    """check_slice holds a finite update to the job's max_norm: over it, refused with the
    reason the round's close gives; at it, and with no bound, accepted."""
    payload = _job(inner_steps=7).round_zero(2)[0]
    result = _answer(payload)  # every value 0.01
    norm = tr.PseudoGradient.decode(
        result, shapes=tr.ModelSpec.parse(MLP).parameter_shapes(), grad_dtype="F32"
    )
    _, exact = tr.check_pseudo_gradient(
        norm, base_sha256=norm.base_sha256, shard_sha256=norm.shard_sha256, steps=7
    )
    tr.check_slice(result, payload, 1 << 20)
    tr.check_slice(result, payload, 1 << 20, max_norm=exact)
    with pytest.raises(RemoteProtocolError, match=r"^norm [0-9.e+-]+ exceeds max_norm 0\.01$"):
        tr.check_slice(result, payload, 1 << 20, max_norm=0.01)
