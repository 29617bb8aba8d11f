"""A runtime for the tests whose self-check fails on a slot with a GPU, as ONNX Runtime's
does where CUDA does not load (loaded in workers as ``self_check_runtime:factory``, with
this directory on the worker's PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path


class CudaThatDoesNotLoad:
    def self_check(self) -> None:
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError("the CUDA execution provider did not load on this GPU slot")

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        return payload


def factory(_cache: Path) -> CudaThatDoesNotLoad:
    return CudaThatDoesNotLoad()
