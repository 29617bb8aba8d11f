"""Bearer tokens on the requester routes and /metrics (coordinator/tokens.py)."""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodeclient import tlstrust
from nodeclient.coordinator import models as m
from nodeclient.coordinator import tokens
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.coordinator.tokens import TokenFileError, TokenSet
from nodeclient.errors import RemoteProtocolError
from tests.coordinator.conftest import Running, inference_payload, make_node, run_inference_job

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"


def token_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_file_holds_one_token_a_line_with_comments(tmp_path: Path) -> None:
    path = token_file(tmp_path / "t", f"# requesters\n\n{ALICE}  # alice\n  {BOB}\n")
    assert tokens.read_token_file(path)[0] == [ALICE, BOB]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("short-token\n", "line 1: a token has 16 to 512 characters"),
        (f"{ALICE} {BOB}\n", "line 1: a token is one word"),
        (f"# x\n{ALICE}\u00e9\n", "line 2: a token is one word of printable ASCII"),
        ("x" * 513, "a token has 16 to 512 characters"),
    ],
)
def test_a_malformed_token_line_is_refused_with_its_number(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(TokenFileError, match=says):
        tokens.read_token_file(token_file(tmp_path / "t", text))


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path / "t", ALICE, mode=0o640)
    with pytest.raises(TokenFileError, match=r"mode 0640: others may read .* chmod 600"):
        tokens.read_token_file(path)
    (tmp_path / "link").symlink_to(token_file(tmp_path / "u", ALICE))
    with pytest.raises(TokenFileError, match="it is a symlink"):
        tokens.read_token_file(tmp_path / "link")
    with pytest.raises(TokenFileError, match="token new --file"):
        tokens.read_token_file(tmp_path / "missing")


def test_the_fix_commands_quote_a_path_with_spaces(tmp_path: Path) -> None:
    """The printed "fix:" command, pasted into a shell, acts on the token file alone: an
    unquoted "my tokens" would chmod the files "my" and "tokens" beside it instead."""
    path = token_file(tmp_path / "my tokens", ALICE, mode=0o640)
    bystanders = [token_file(tmp_path / name, "", mode=0o644) for name in ("my", "tokens")]
    with pytest.raises(TokenFileError) as refused:
        tokens.read_token_file(path)
    command = str(refused.value).rpartition("fix: ")[2]
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, capture_output=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [stat.S_IMODE(b.stat().st_mode) for b in bystanders] == [0o644, 0o644]
    with pytest.raises(TokenFileError) as missing:
        tokens.read_token_file(tmp_path / "new tokens")
    command = str(missing.value).rpartition("fix: ")[2].strip("`")
    assert shlex.split(command) == [
        "nodeclient-coordinator",
        "token",
        "new",
        "--file",
        str(tmp_path / "new tokens"),
    ]


def test_token_new_creates_the_file_0600_and_appends(tmp_path: Path, capsys) -> None:
    path = tmp_path / "requesters.tok"
    assert main(["token", "new", "--file", str(path), "--label", "alice"]) == 0
    first = capsys.readouterr().out.strip()
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.write_text(path.read_text() + f"{BOB}")  # a last line written without its newline
    assert main(["token", "new", "--file", str(path)]) == 0
    second = capsys.readouterr().out.strip()
    assert len(first) == len(second) == 43 and first != second
    assert path.read_text() == f"{first}  # alice\n{BOB}\n{second}\n"
    assert tokens.read_token_file(path)[0] == [first, BOB, second]


def test_token_new_refuses_an_unsafe_file_or_label(tmp_path: Path, capsys) -> None:
    path = token_file(tmp_path / "t", f"{ALICE}\n", mode=0o644)
    assert main(["token", "new", "--file", str(path)]) == 2
    assert "mode 0644" in capsys.readouterr().err
    assert path.read_text() == f"{ALICE}\n"
    path.chmod(0o600)
    for label in ("a\nb", "x # y"):
        assert main(["token", "new", "--file", str(path), "--label", label]) == 2
    assert path.read_text() == f"{ALICE}\n"


def test_a_token_set_follows_its_file_and_fails_closed(tmp_path: Path) -> None:
    now = [0.0]
    path = token_file(tmp_path / "t", f"{ALICE}\n")
    guard = TokenSet(path, clock=lambda: now[0])
    assert guard.check(ALICE.encode()) is None
    assert guard.check(BOB.encode()) == "wrong"
    assert guard.check(None) == "missing"
    token_file(path, f"{BOB}\n")  # Alice revoked, Bob added
    assert guard.check(ALICE.encode()) is None  # not looked at again within a second
    now[0] = 1.5
    assert guard.check(ALICE.encode()) == "wrong"
    assert guard.check(BOB.encode()) is None
    path.chmod(0o644)  # the file turned unsafe (only its ctime changes): nothing is accepted
    now[0] = 3.0
    assert guard.check(BOB.encode()) == "unusable"
    path.chmod(0o600)
    now[0] = 4.5
    assert guard.check(BOB.encode()) is None
    os.chown(path, 12345, -1)  # another owner
    now[0] = 6.0
    assert guard.check(BOB.encode()) == "unusable"
    os.chown(path, os.geteuid(), -1)
    now[0] = 7.5
    assert guard.check(BOB.encode()) is None
    path.unlink()
    now[0] = 9.0
    assert guard.check(BOB.encode()) == "unusable"


def test_only_digests_of_the_tokens_are_kept(tmp_path: Path) -> None:
    guard = TokenSet(token_file(tmp_path / "t", f"{ALICE}\n"))
    assert guard._digests == frozenset({hashlib.sha256(ALICE.encode()).digest()})


@pytest.fixture
def guarded(start_coordinator, tmp_path: Path) -> Running:
    requesters = token_file(tmp_path / "requesters", f"{ALICE}\n")
    scrapers = token_file(tmp_path / "metrics", f"{BOB}\n")
    return start_coordinator(requester_token_file=requesters, metrics_token_file=scrapers)


def with_token(running: Running, token: str | None) -> CoordinatorClient:
    return CoordinatorClient(running.url, token=token)


REQUESTER_ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
    ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/result"),
    ("POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"),
    ("GET", "/v1/tasks/00000000-0000-0000-0000-000000000000/result"),
    ("POST", "/v1/blobs"),
]


@pytest.mark.parametrize(("method", "path"), REQUESTER_ROUTES)
def test_requester_routes_need_a_requester_token(guarded: Running, method, path) -> None:
    for headers in ({}, {"Authorization": f"Bearer {BOB}"}, {"Authorization": f"Basic {ALICE}"}):
        answer = httpx.request(method, guarded.url + path, headers=headers, content=b"{}")
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer <token>" in answer.json()["error"]
    answer = httpx.request(
        method, guarded.url + path, headers={"Authorization": f"Bearer {ALICE}"}, content=b"{}"
    )
    assert answer.status_code != 401


def test_an_upload_without_a_token_is_refused_before_its_body_is_read(guarded: Running) -> None:
    sent, total = 0, 50 * 1024 * 1024

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while sent < total:
            sent += 65536
            yield b"x" * 65536

    answer = httpx.post(guarded.url + "/v1/blobs", content=chunks())
    assert answer.status_code == 401
    assert answer.headers["connection"] == "close"
    assert sent < total // 2


def test_metrics_need_a_metrics_token(guarded: Running) -> None:
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    requester = httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"})
    assert requester.status_code == 401  # a requester's token does not open /metrics
    scraper = httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {BOB}"})
    assert scraper.status_code == 200 and 'jobs{status="queued"}' in scraper.text


def test_what_nodes_use_stays_open(guarded: Running, rsa_keys) -> None:
    from tests.coordinator.conftest import make_node

    assert httpx.get(guarded.url + "/healthz").status_code == 200
    node = make_node(rsa_keys, 0)
    assert guarded.register(node)["node_id"] == node.node_id  # POST /v1/nodes
    assert guarded.link(node)["type"] == "welcome"
    assert httpx.get(guarded.url + "/v1/nodes").status_code == 200
    digest = with_token(guarded, ALICE).upload_blob(b"model bytes")["sha256"]
    fetched = httpx.get(guarded.url + f"/v1/blobs/{digest}")
    assert fetched.status_code == 200 and fetched.content == b"model bytes"


def test_a_job_round_trip_with_a_token(guarded: Running) -> None:
    client = with_token(guarded, ALICE)
    job = client.submit_job("ai.inference", inference_payload([1.0, 2.0]))
    assert client.job(job["job_id"])["status"] in ("queued", "running")
    assert [j["job_id"] for j in client.jobs()] == [job["job_id"]]
    with pytest.raises(RemoteProtocolError, match="401 no bearer token"):
        with_token(guarded, None).jobs()


CAROL = "carol-token-0123456789abcdef"


def test_a_requester_reads_and_cancels_only_its_own_jobs(
    start_coordinator, tmp_path: Path, rsa_keys
) -> None:
    """Another requester's job is 404 on every route (as if it did not exist: its id
    tells the caller nothing), and missing from the list; its owner sees it all."""
    requesters = token_file(tmp_path / "requesters", f"{ALICE}\n{CAROL}\n")
    running = start_coordinator(requester_token_file=requesters)
    alice, carol = with_token(running, ALICE), with_token(running, CAROL)
    running.client = alice
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    done = run_inference_job(running, node, [1.0, 2.0])
    job_id, task_id = done["job_id"], done["tasks"][0]["task_id"]
    queued = alice.submit_job("ai.inference", inference_payload([3.0]))["job_id"]
    mine = carol.submit_job("ai.inference", inference_payload([4.0]))["job_id"]

    assert [j["job_id"] for j in carol.jobs()] == [mine]
    assert {j["job_id"] for j in alice.jobs()} == {job_id, queued}  # one clock time: any order
    for read in (
        lambda: carol.job(job_id),
        lambda: carol.job(job_id, tasks=False),
        lambda: carol.raw_job_result(job_id),
        lambda: carol.task_result(task_id),
        lambda: carol.cancel_job(queued),
    ):
        with pytest.raises(RemoteProtocolError, match=r"404 no (job|task) "):
            read()
    head = httpx.head(running.url + f"/v1/tasks/{task_id}/result",
                      headers={"Authorization": f"Bearer {CAROL}"})  # fmt: skip
    assert head.status_code == 404
    assert alice.job(job_id)["status"] == "succeeded"
    assert alice.task_result(task_id) == alice.raw_job_result(job_id)
    assert alice.cancel_job(queued)["status"] == "failed"
    assert running.coord.db.run_sync(lambda s: s.get_one(m.Job, mine).requester) == (
        hashlib.sha256(CAROL.encode()).hexdigest()
    )


def test_the_requester_cli_sends_the_token(guarded: Running, tmp_path: Path, capsys,
                                           monkeypatch) -> None:  # fmt: skip
    mine = token_file(tmp_path / "mine", f"# mine\n{ALICE}\n")
    assert main(["jobs", "--coordinator", guarded.url, "--token-file", str(mine)]) == 0
    monkeypatch.setenv("NODECLIENT_COORDINATOR_TOKEN", ALICE)
    assert main(["jobs", "--coordinator", guarded.url]) == 0
    monkeypatch.setenv("NODECLIENT_COORDINATOR_TOKEN", BOB)
    assert main(["jobs", "--coordinator", guarded.url]) == 1
    assert "401 the token is not accepted" in capsys.readouterr().err
    mine.chmod(0o644)
    assert main(["jobs", "--coordinator", guarded.url, "--token-file", str(mine)]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")  # serve configures logging before it stops
def test_a_coordinator_does_not_start_with_an_unusable_token_file(tmp_path: Path, capsys) -> None:
    bad = token_file(tmp_path / "t", f"{ALICE}\n", mode=0o644)
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path / "d")]
    assert main([*argv, "--requester-token-file", str(bad)]) == 2
    assert "refusing the token file" in capsys.readouterr().err
    assert main([*argv, "--metrics-token-file", str(tmp_path / "missing")]) == 2
    assert "no token file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("::ffff:127.0.0.1", True),
     ("0.0.0.0", False), ("::", False), ("192.0.2.7", False), ("coord.example", False)],
)  # fmt: skip
def test_which_hosts_count_as_loopback_for_the_open_routes_warning(host, loopback) -> None:
    """serve's warning about open requester routes and the clients' warning about plain
    http judge loopback alike (one function)."""
    assert tlstrust.is_loopback(host) is loopback


def test_token_new_on_a_full_disk_leaves_the_file_as_it_was(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The disk fills after part of the line is written: the file is cut back to what it
    held (a cut-off token would make it unusable, or accept a prefix of the one printed),
    nothing is printed, and the exit status says it failed."""
    path = token_file(tmp_path / "t", f"{ALICE}\n")
    real_write = os.write
    calls: list[int] = []

    def full_disk(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:10]))  # a short write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokens.os, "write", full_disk)
    assert main(["token", "new", "--file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "No space left on device; it is as it was" in err
    assert path.read_text() == f"{ALICE}\n"
    assert len(calls) == 2
