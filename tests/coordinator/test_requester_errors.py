"""Transport failures as the requester sees them: unreachable (nothing sent) apart from no
answer (sent, maybe applied), and `submit --wait` riding out a brief poll failure."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nodeclient.coordinator import cli
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.client import CoordinatorClient, NoAnswer, Unreachable
from nodeclient.errors import UsageError

J1 = "6f1c2a3e-9b0d-4c57-8e21-3d4f5a6b7c8d"  # a job id, as the protocol has them
JOB = {"job_id": J1, "workload_class": "ai.inference", "status": "queued", "tasks": []}
Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> CoordinatorClient:
    return CoordinatorClient("http://c.example", transport=httpx.MockTransport(handler))


def _raise(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return handler


@pytest.mark.parametrize("exc", [httpx.ConnectError, httpx.ConnectTimeout])
def test_a_connection_that_never_opened_is_unreachable(exc: type[httpx.TransportError]) -> None:
    """Nothing was sent: "cannot reach", a usage error as before."""
    with pytest.raises(Unreachable, match="^cannot reach the coordinator at http://c.example"):
        _client(_raise(exc)).submit_job("ai.inference", b"x")
    assert issubclass(Unreachable, UsageError)


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError])
def test_a_submission_without_an_answer_may_have_created_the_job(
    exc: type[httpx.TransportError],
) -> None:
    """A slow or dropped answer to POST /v1/jobs is not "cannot reach": the job may exist,
    and the message says how to look."""
    with pytest.raises(NoAnswer) as caught:
        _client(_raise(exc)).submit_job("ai.inference", b"x")
    text = str(caught.value)
    assert text.startswith("no answer from the coordinator at http://c.example to POST /v1/jobs")
    assert exc.__name__ in text
    assert "may have been created" in text
    assert "nodeclient-coordinator jobs" in text
    assert "cannot reach" not in text


def test_a_read_without_an_answer_has_no_warning() -> None:
    """A GET changes nothing: no answer is just that."""
    with pytest.raises(NoAnswer) as caught:
        _client(_raise(httpx.ReadTimeout)).jobs()
    assert str(caught.value) == (
        "no answer from the coordinator at http://c.example to GET /v1/jobs (ReadTimeout: boom)"
    )


@pytest.fixture
def serve_with(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], None]:
    """Point the CLI's client at a handler instead of the network; polls do not sleep."""
    monkeypatch.setattr(cli, "POLL_S", 0.0)

    def use(handler: Handler) -> None:
        def client(url: str, token: str | None = None) -> CoordinatorClient:
            return CoordinatorClient(url, token=token, transport=httpx.MockTransport(handler))

        monkeypatch.setattr(cli, "CoordinatorClient", client)

    return use


def _submit(tmp_path: Path, *extra: str) -> int:
    (tmp_path / "p.bin").write_bytes(b"payload")
    return main(["submit", "--class", "ai.inference", "--payload", str(tmp_path / "p.bin"),
                 *extra])  # fmt: skip


def test_submit_without_an_answer_says_how_to_check(serve_with, tmp_path: Path, capsys) -> None:
    """The CLI prints one line naming the `jobs` check, exit 1, and no job id."""
    serve_with(_raise(httpx.ReadTimeout))
    assert _submit(tmp_path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "may have been created" in err and "nodeclient-coordinator jobs" in err


def test_wait_rides_out_a_few_failed_polls(serve_with, tmp_path: Path, capsys) -> None:
    """A poll that times out, cannot connect or loses its answer is tried again."""
    failures = [httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError]
    polls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal polls
        if request.method == "POST":
            return httpx.Response(201, json=JOB)
        polls += 1
        if failures:
            raise failures.pop(0)("brief", request=request)
        return httpx.Response(200, json={**JOB, "status": "succeeded"})

    serve_with(handler)
    assert _submit(tmp_path, "--wait") == 0
    assert polls == 4
    assert capsys.readouterr().out == J1 + "\n"


def test_wait_gives_up_after_failed_polls_in_a_row(serve_with, tmp_path: Path, capsys) -> None:
    """A coordinator that stays away ends the wait with one line."""
    polls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal polls
        if request.method == "POST":
            return httpx.Response(201, json=JOB)
        polls += 1
        raise httpx.ConnectError("refused", request=request)

    serve_with(handler)
    assert _submit(tmp_path, "--wait") == 2
    assert polls == cli.POLL_RETRIES + 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot reach the coordinator" in err
    assert f"gave up after {polls} failed polls in a row" in err


def _answering(body: object) -> Handler:
    text = body if isinstance(body, bytes) else json.dumps(body).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        status = 201 if request.method == "POST" else 200
        return httpx.Response(status, content=text, headers={"content-type": "application/json"})

    return handler


def _deep(depth: int) -> bytes:
    """A job whose one task nests *depth* jobs deep (json.dumps would overflow first)."""
    head = (
        b'{"job_id": "'
        + J1.encode()
        + b'", "workload_class": "x", "status": "queued", "tasks": [{"x": '
    )
    return head + b"[" * depth + b"]" * depth + b"}]}"


NOT_A_JOB = [[1, 2, 3], {}, {"job_id": 7, "workload_class": "x", "status": "queued"}, "text"]
PARTS_WRONG = [{**JOB, "tasks": [1]}, {**JOB, "tasks": [{"task_id": "t"}]}, [JOB, 5], _deep(900)]
SUBMIT_READS_NOT = [PARTS_WRONG[1], PARTS_WRONG[3]]  # a task's fields: submit reads no task


@pytest.mark.usefixtures("stock_recursion_limit")
@pytest.mark.parametrize(
    "body", NOT_A_JOB + PARTS_WRONG,
    ids=["list", "empty", "id-not-str", "string", "task-not-object", "task-missing-fields",
         "listing-with-a-number", "deep"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["jobs", "job", "submit", "result"])
def test_an_answer_of_another_shape_is_one_line(
    serve_with, tmp_path: Path, capsys, body: object, command: str
) -> None:
    """Valid JSON that is not what the API documents (a proxy's, another service's): one
    line and exit 1, never a traceback; a submission says the job may exist."""
    serve_with(_answering(body))
    args = {
        "jobs": ["jobs"], "job": ["job", "j1"], "result": ["result", "j1", "-o",
        str(tmp_path / "out")],
        "submit": ["submit", "--class", "ai.inference", "--payload", str(tmp_path / "p.bin")],
    }[command]  # fmt: skip
    (tmp_path / "p.bin").write_bytes(b"payload")
    rc = main([*args, "--coordinator", "http://c.example"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    # Not a job object at all: every command refuses it. The others fail where the
    # command reads the part that is wrong: `submit` reads only the job's id, of a job
    # whose tasks it does not look into.
    if command == "submit" and body in SUBMIT_READS_NOT:
        assert (rc, out, err) == (0, J1 + "\n", "")
        return
    assert rc == 1, err
    assert err.startswith("nodeclient-coordinator: coordinator: ") and err.count("\n") == 1
    if command == "submit":
        assert "may have been created" in err


RESULT = b"the job's result bytes " * 1000
DONE = {**JOB, "status": "succeeded", "result_sha256": hashlib.sha256(RESULT).hexdigest()}


def _results(body: bytes) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/result"):
            return httpx.Response(200, content=body)
        return httpx.Response(200, json=DONE)

    return handler


def test_result_is_checked_before_it_replaces_the_output(serve_with, tmp_path: Path,
                                                         capsys) -> None:  # fmt: skip
    """`result -o FILE`: the checked result replaces FILE whole; bytes that do not match
    the job's result_sha256 leave FILE as it was, and no temporary file behind."""
    out = tmp_path / "out.bin"
    out.write_bytes(b"an earlier good result")
    serve_with(_results(RESULT[:-1] + b"!"))
    assert main(["result", "j1", "-o", str(out), "--coordinator", "http://c.example"]) == 1
    assert "not saved" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier good result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    serve_with(_results(RESULT))
    assert main(["result", "j1", "-o", str(out), "--coordinator", "http://c.example"]) == 0
    assert out.read_bytes() == RESULT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_result_on_a_full_disk_leaves_the_output_as_it_was(
    serve_with, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the result streams in: one line saying the output was not
    changed, exit 2, the earlier file intact and the partial one removed."""
    out = tmp_path / "out.bin"
    out.write_bytes(b"an earlier good result")
    serve_with(_results(RESULT))

    def fills_up(self: CoordinatorClient, job_id: str, write: Callable[[bytes], object]) -> int:
        write(RESULT[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CoordinatorClient, "save_job_result", fills_up)
    assert main(["result", "j1", "-o", str(out), "--coordinator", "http://c.example"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"{out} was not changed" in err
    assert out.read_bytes() == b"an earlier good result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_result_goes_where_o_points_without_replacing_what_is_there(
    serve_with, tmp_path: Path
) -> None:
    """-o through a symlink writes its target (the link stays); -o to a device such as
    /dev/null leaves the device (a rename would have put a file in its place, as root);
    an existing file keeps its mode, a new one gets the umask's."""
    serve_with(_results(RESULT))
    url = ["--coordinator", "http://c.example"]
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    real.chmod(0o644)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    assert main(["result", "j1", "-o", str(link), *url]) == 0
    assert link.is_symlink() and real.read_bytes() == RESULT
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    device = tmp_path / "null"  # a /dev/null of our own: a regression must not take the real one
    drained: list[bytes] = []
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:  # not root: a FIFO with a reader is no regular file either
        os.mkfifo(device)
        reader = threading.Thread(target=lambda: drained.append(device.read_bytes()))
        reader.start()
    assert main(["result", "j1", "-o", str(device), *url]) == 0
    kind = os.lstat(device).st_mode
    assert stat.S_ISCHR(kind) or (stat.S_ISFIFO(kind) and drained in ([], [RESULT]))
    fresh = tmp_path / "fresh.bin"
    mask = os.umask(0o027)
    try:
        assert main(["result", "j1", "-o", str(fresh), *url]) == 0
    finally:
        os.umask(mask)
    assert fresh.read_bytes() == RESULT and stat.S_IMODE(fresh.stat().st_mode) == 0o640
    names = ["fresh.bin", "link.bin", "null", "real.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_a_wait_that_runs_out_has_its_own_status(serve_with, tmp_path: Path, capsys) -> None:
    """`submit --wait --timeout S` whose job is still queued: exit 124 (as timeout(1)), not
    2, which a script would read as bad arguments; the line says how to follow the job."""
    serve_with(_answering(JOB))
    assert _submit(tmp_path, "--wait", "--timeout", "0", "--coordinator", "http://c.example") == 124
    err = capsys.readouterr().err
    assert f"job {J1} still queued after 0.0 s" in err and f"nodeclient-coordinator job {J1}" in err


def test_a_ctrl_c_while_waiting_says_the_job_goes_on(
    serve_with, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_with(_answering(JOB))

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_wait", interrupted)
    assert _submit(tmp_path, "--wait", "--coordinator", "http://c.example") == 130
    assert f"job {J1} goes on: follow it with `nodeclient-coordinator job {J1}`" in (
        capsys.readouterr().err
    )


def test_a_requester_token_file_that_is_missing_says_where_tokens_come_from(
    tmp_path: Path, capsys
) -> None:
    """Not `token new` (which makes a token the coordinator does not know): the operator
    gives one."""
    missing = tmp_path / "mine.tok"
    assert main(["jobs", "--token-file", str(missing), "--coordinator", "http://c.example"]) == 2
    err = capsys.readouterr().err
    assert "the coordinator's operator gave you" in err and "token new" not in err
    missing.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text("x" * 20)
    (tmp_path / "elsewhere").chmod(0o600)
    assert main(["jobs", "--token-file", str(missing), "--coordinator", "http://c.example"]) == 2
    assert "it is a symlink; fix: name the file itself" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["nan", "-5", "inf", "soon"])
def test_a_wait_timeout_must_be_a_finite_time_of_zero_or_more(
    timeout: str, serve_with, tmp_path: Path, capsys
) -> None:
    """`--timeout nan` never timed out (every comparison with nan is false) and a
    negative one gave up at the first poll: both are refused before anything is sent."""
    sent: list[httpx.Request] = []
    serve_with(lambda request: sent.append(request) or httpx.Response(201, json=JOB))
    with pytest.raises(SystemExit) as exc:
        _submit(tmp_path, "--wait", "--timeout", timeout, "--coordinator", "http://c.example")
    assert exc.value.code == 2
    assert "argument --timeout: " in capsys.readouterr().err
    assert sent == []


def test_result_refuses_a_terminal_on_stdout(serve_with) -> None:
    """Without -o, the result's bytes (the node's, binary) are not written to a
    terminal, where escape sequences in them would act: one line, exit 2."""
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nodeclient.coordinator.cli", "result", "j1",
             "--coordinator", "http://127.0.0.1:9"],
            stdout=follower, stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2
    assert b"stdout is a terminal: write it with -o FILE" in proc.stderr


def test_result_to_a_symlink_loop_is_one_line(serve_with, tmp_path: Path, capsys) -> None:
    """-o naming a symlink loop: one line and exit 2, not a traceback."""
    serve_with(_results(RESULT))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["result", "j1", "-o", str(loop), "--coordinator", "http://c.example"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the result to {loop}" in err and "Traceback" not in err


def test_a_result_written_in_place_that_fails_says_the_file_is_partial(tmp_path: Path) -> None:
    """A FILE in a directory the user may not write is written in place; when that fails
    half way (here a file-size limit, as a full disk would), the error says FILE now holds
    only part of the result, instead of implying it was left as it was."""
    import subprocess
    import sys

    checked = tmp_path / "checked.bin"
    checked.write_bytes(os.urandom(3 << 20))
    out = tmp_path / "out.bin"
    out.write_bytes(b"OLD CONTENTS")
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from nodeclient.coordinator.cli import _copy_checked\n"
        "from nodeclient.errors import UsageError\n"
        "try:\n"
        "    _copy_checked(sys.argv[1], Path(sys.argv[2]))\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(checked), str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"{out} now holds at most part of the result: remove it" in proc.stdout
    assert out.stat().st_size == 1 << 20


def test_a_result_that_could_not_be_opened_in_place_left_the_file_as_it_was(
    tmp_path: Path,
) -> None:
    """When the in-place write fails at its open, nothing was truncated: the error says
    the output was not changed, not that it holds part of the result."""
    checked = tmp_path / "checked.bin"
    checked.write_bytes(b"result")
    where = tmp_path / "a-directory"
    where.mkdir()
    with pytest.raises(UsageError) as caught:
        cli._copy_checked(str(checked), where)
    assert str(caught.value).endswith(f"; {where} was not changed")
