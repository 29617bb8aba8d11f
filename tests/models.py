"""Small ONNX models built in code, and a real classifier, for the inference tests.

Built with onnx.helper rather than stored as binary fixtures so that each test shows what
the model computes. The classifier is trained on scikit-learn's bundled digits data set,
which ships with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # accepted by every onnxruntime release that supports opset 17


def _model(graph: Any) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return bytes(model.SerializeToString())


def identity_model(
    *, elem_type: int = TensorProto.FLOAT, shape: list[int | str] | None = None
) -> bytes:
    """y = x, for any input of *elem_type*; *shape* None declares no shape at all."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )
    return _model(graph)


def add_model() -> bytes:
    """sum = a + b, both float32 of shape [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3])],
    )
    return _model(graph)


MATMUL_WEIGHTS = np.array(
    [[1.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.0, 0.25], [-1.0, 3.0, 1.0]], dtype=np.float32
)


def matmul_relu_model() -> bytes:
    """y = relu(x @ W) for x of shape [N, 4] and the fixed W = MATMUL_WEIGHTS (4 x 3)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Relu", ["xw"], ["y"]),
        ],
        "matmul_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(MATMUL_WEIGHTS, name="W")],
    )
    return _model(graph)


def string_output_model() -> bytes:
    """label = Cast(x, to=string): a model whose output no result container can carry."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["label"], to=TensorProto.STRING)],
        "string_output",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, [2])],
    )
    return _model(graph)


def unknown_op_model(node_name: str = "") -> bytes:
    """A well-formed protobuf whose graph uses an operator no runtime implements, in a node
    named *node_name* (which ONNX Runtime's refusal quotes)."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"], name=node_name)],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return _model(graph)


def sparse_model(elements: int) -> bytes:
    """y = x + w, where w is a sparse initializer: one value 1.0 at index 0 of *elements*."""
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("w_indices", TensorProto.INT64, [1], [0]),
        [elements],
    )
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])],
        sparse_initializer=[sparse],
    )
    return _model(graph)


def external_data_model(location: str, length: int) -> bytes:
    """y = W, where W's bytes live in the external file *location* (a hostile model)."""
    weights = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[length])
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])],
        "external",
        [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [length])],
        [weights],
    )
    return _model(graph)


@dataclass(frozen=True, eq=False)
class DigitsClassifier:
    """A scikit-learn classifier, its ONNX export, and a held-out split of the digits data."""

    estimator: Any
    onnx_model: bytes
    zipmap_model: bytes  # the default export, whose probabilities are a sequence of maps
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def train_digits_classifier() -> DigitsClassifier:
    """Logistic regression on 8x8 digits (1797 samples), exported with skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    estimator = LogisticRegression(max_iter=2000)
    # One BLAS thread: on a busy two-core runner, threaded BLAS makes this tiny fit
    # about a hundred times slower (seconds instead of tens of milliseconds).
    with threadpool_limits(limits=1):
        estimator.fit(x_train, y_train)
    plain = to_onnx(estimator, x_train[:1], options={"zipmap": False}, target_opset=OPSET)
    zipmap = to_onnx(estimator, x_train[:1], target_opset=OPSET)
    return DigitsClassifier(
        estimator=estimator,
        onnx_model=bytes(plain.SerializeToString()),
        zipmap_model=bytes(zipmap.SerializeToString()),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
    )


def slow_model(depth: int = 24, width: int = 512) -> bytes:
    """A chain of MatMul + Tanh sharing one weight: runtime scales with the batch size.

    Used by end-to-end tests that need a task to be running long enough to kill a process
    in the middle of it.
    """
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = []
    prev = "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return _model(graph)
