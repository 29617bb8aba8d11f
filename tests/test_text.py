"""Text from elsewhere shown on a terminal: control characters become visible escapes."""

from __future__ import annotations

from nodeclient.text import printable, printable_tree


def test_control_characters_become_escapes() -> None:
    """C0, C1, DEL and the bidirectional controls are written out; the rest is kept."""
    assert printable("a\x1b[2J\nb\tc\x7fd\x9be") == "a\\x1b[2J\\x0ab\\x09c\\x7fd\\x9be"
    assert printable("admin\u202egnp.exe\u2066") == "admin\\u202egnp.exe\\u2066"
    assert printable("naïve 東京 → ok") == "naïve 東京 → ok"


def test_every_string_of_a_tree_is_made_printable() -> None:
    tree = {"k\x1b": ["v\n", {"deep": "\x07"}], "n": 3, "none": None}
    assert printable_tree(tree) == {
        "k\\x1b": ["v\\x0a", {"deep": "\\x07"}],
        "n": 3,
        "none": None,
    }
