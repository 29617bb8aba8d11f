"""Runtimes that execute workloads on this machine (2.3.5 Work Execution).

``usable_workload_classes`` feeds the manifest's ``workload_classes``: a class is
advertised only when its runtime can actually run here.
"""

from __future__ import annotations


def usable_workload_classes() -> dict[str, tuple[bool, str]]:
    """Each known workload class -> (usable here, why or why not)."""
    from nodeclient.node.runtimes import onnx

    return {"ai.inference": onnx.usable()}
