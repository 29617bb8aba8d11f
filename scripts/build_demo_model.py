"""Rebuild the devnet's demo assets: a digits classifier (ONNX) and held-out samples.

Trains a logistic regression on scikit-learn's bundled digits data (no download),
converts it with skl2onnx, and writes src/nodeclient/assets/{digits.onnx, digits_test.npz}.
Deterministic: the same library versions give the same files.

The demo render scene (assets/demo_scene.blend, 6 frames, packed) is the "cube" variant
that tests/blender_scenes.py builds with Blender's own Python:
``python -c "from tests.blender_scenes import build_scenes; ..."``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

OUT = Path(__file__).resolve().parent.parent / "src" / "nodeclient" / "assets"


def main() -> None:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=2000, random_state=0).fit(x_train, y_train)
    onx = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    (OUT / "digits.onnx").write_bytes(onx.SerializeToString())
    np.savez_compressed(OUT / "digits_test.npz", x=x_test, y=y_test.astype(np.int64))
    print(f"accuracy on held-out digits: {clf.score(x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
