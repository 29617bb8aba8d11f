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


def test_json_log_lines_carry_no_character_a_terminal_obeys() -> None:
    """The JSON log keeps other non-ASCII text readable, but json.dumps leaves C1 controls
    (U+009B alone starts a control sequence), DEL, the bidi controls and the line
    separators raw: a coordinator's error text in a log line must not reach the operator's
    terminal as them. The line is still the same JSON value."""
    import json
    import logging

    from nodeclient.logs import JsonFormatter

    reason = "\u009b2J\u009bH\u009b1;31mNODE KEY COMPROMISED\x7f \u202etxt.exe\u2028 naïve 東京"
    record = logging.LogRecord("nodeclient.node", logging.WARNING, "", 0, "link.error_frame",
                               None, None)  # fmt: skip
    record.reason = reason
    line = JsonFormatter().format(record)
    assert not any(0x7F <= ord(c) <= 0x9F or c in "\u202e\u2028" for c in line), line
    assert "naïve 東京" in line  # the rest stays readable
    assert json.loads(line)["reason"] == reason


def test_lone_surrogates_become_escapes() -> None:
    """A lone surrogate (a JSON "\\ud800", a file name that is not UTF-8) cannot be encoded
    by a UTF-8 stream: it is written out, and the result encodes."""
    shown = printable("maintenance \ud800 /tmp/caf\udce9 \udfff")
    assert shown == "maintenance \\ud800 /tmp/caf\\udce9 \\udfff"
    shown.encode("utf-8")  # raises for a surrogate left raw
    assert printable_tree({"\udc80": ["\ud83d"]}) == {"\\udc80": ["\\ud83d"]}


def test_a_json_log_line_with_a_lone_surrogate_can_be_written() -> None:
    """A coordinator's error with "\\ud800" in it, logged as JSON: the line encodes as UTF-8
    (logging would otherwise lose the event on a failed write) and reads back the same."""
    import json
    import logging

    from nodeclient.logs import JsonFormatter

    record = logging.LogRecord("nodeclient.node", logging.WARNING, "", 0, "link.error",
                               None, None)  # fmt: skip
    record.error = "registration failed (503): \ud800 maintenance"
    line = JsonFormatter().format(record)
    line.encode("utf-8")
    assert json.loads(line)["error"] == record.error
