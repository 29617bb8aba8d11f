"""The console scripts' entry points (nodeclient/entry.py): a Ctrl-C while the command
line modules import ends the command with status 130 and one line, no traceback."""

from __future__ import annotations

import importlib.abc
import sys
import tomllib
from pathlib import Path

import pytest

from nodeclient import entry


class _CtrlC(importlib.abc.MetaPathFinder):
    """Raises KeyboardInterrupt when *name* is imported, as a Ctrl-C in its import would."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == self.name:
            raise KeyboardInterrupt
        return


@pytest.mark.parametrize(
    ("run", "module", "prog"),
    [(entry.node, "nodeclient.node.cli", "nodeclient"),
     (entry.coordinator, "nodeclient.coordinator.cli", "nodeclient-coordinator")],
)  # fmt: skip
def test_a_ctrl_c_during_the_imports_is_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys, run, module: str, prog: str
) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_CtrlC(module), *sys.meta_path])
    assert run() == 130
    assert capsys.readouterr().err == f"{prog}: interrupted\n"


def test_the_console_scripts_start_there() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {
        "nodeclient": "nodeclient.entry:node",
        "nodeclient-coordinator": "nodeclient.entry:coordinator",
    }
