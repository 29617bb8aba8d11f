"""``nodeclient service install``: the systemd unit, checked directive by directive and by systemd.

``systemd-analyze verify`` (Debian package ``systemd``) parses the unit with systemd's
own parser and reports unknown keys, bad values and a non-executable ExecStart=.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.errors import UsageError
from nodeclient.node import service
from nodeclient.node.cli import main

_CODE_PATHS = service._code_paths  # before the fixture below replaces it


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own temporary directories are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nodeclient-service-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


TMP_ROOTS = service.PRIVATE_TMP_ROOTS  # before any test replaces them


@pytest.fixture(autouse=True)
def _system_install(open_dir: Path, monkeypatch) -> None:
    """The unit's tests run as if nodeclient were a system-wide install: a console script
    in a directory every user may enter, run by /usr/bin/python3. (This test process's
    own interpreter may live under /root, mode 0700, which `service install` refuses:
    tested at the end.)"""
    script = open_dir / "nodeclient"
    script.write_text("#!/usr/bin/python3\n")
    script.chmod(0o755)
    monkeypatch.setattr(service, "find_executable", lambda: script)
    monkeypatch.setattr(service, "_code_paths", lambda: (Path("/usr/lib"),))
    # The stand-in lives under /tmp, which the unit's PrivateTmp= would hide: tested on
    # its own below, with the real roots.
    monkeypatch.setattr(service, "PRIVATE_TMP_ROOTS", ())


def exe() -> Path:
    return service.find_executable()


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd allows repeated keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def install(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    path = tmp_path / "nodeclient.service"
    rc = main(["service", "install", "--output", str(path), *extra])
    return rc, path


def test_unit_hardening_directives(tmp_path: Path, capsys) -> None:
    """Every directive the operator relies on is present with the right value."""
    rc, path = install(tmp_path)
    assert rc == 0
    svc = parse(path.read_text())["Service"]
    one = {k: v[0] for k, v in svc.items()}
    assert one["ExecStart"] == f"{exe()} run --home /var/lib/nodeclient --log-format json"
    assert one["User"] == one["Group"] == "nodeclient"
    assert one["StateDirectory"] == "nodeclient" and one["StateDirectoryMode"] == "0700"
    assert one["UMask"] == "0077"
    assert one["LimitCORE"] == "0"  # the daemon holds the decrypted node key: no core files
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict"
    assert one["PrivateTmp"] == "yes" and one["Restart"] == "on-failure"
    # 78 (a refused registration, a damaged outbox) would fail again: no restart
    assert one["RestartPreventExitStatus"] == "78"
    assert one["LimitNOFILE"] == "65536"  # slots' pipes and disk walks: not systemd's 1024
    assert one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed"
    assert int(one["TimeoutStopSec"]) > 70  # the daemon drains 60 s of tasks + 10 s of outbox
    assert one["DevicePolicy"] == "closed"
    assert "char-nvidia-frontend rw" in svc["DeviceAllow"]  # /dev/nvidia0.. and nvidiactl
    assert "char-nvidia-uvm rw" in svc["DeviceAllow"] and "/dev/nvidiactl rw" in svc["DeviceAllow"]
    for forbidden in ("RestrictNamespaces", "PrivateUsers", "PrivateDevices", "SystemCallFilter"):
        assert forbidden not in svc  # bubblewrap and CUDA need what these would take away
    assert one["ProtectKernelModules"] == one["ProtectControlGroups"] == "yes"
    unit = parse(path.read_text())
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert unit["Unit"]["After"] == ["network-online.target", "time-sync.target"]
    assert unit["Unit"]["Wants"] == ["network-online.target", "time-sync.target"]


def test_unit_is_public_and_prints_next_steps(tmp_path: Path, capsys) -> None:
    """The unit is written 0644 and the command says what to run next."""
    rc, path = install(tmp_path, "--user", "gpu-seller")
    out = capsys.readouterr().out
    assert rc == 0 and path.stat().st_mode & 0o777 == 0o644
    assert "User=gpu-seller" in path.read_text()
    assert "systemctl daemon-reload" in out and "systemctl enable --now nodeclient.service" in out
    assert "install -d -m 0700 -o gpu-seller -g gpu-seller /var/lib/nodeclient" in out


def test_unit_replaces_an_older_one(tmp_path: Path) -> None:
    """Installing again overwrites the unit (an upgrade), atomically, leaving no temp file."""
    path = tmp_path / "nodeclient.service"
    path.write_text("old")
    assert install(tmp_path)[0] == 0
    assert path.read_text().startswith("# nodeclient node daemon")
    assert [p.name for p in tmp_path.iterdir()] == ["nodeclient.service"]


def test_home_flag_sets_the_units_home(tmp_path: Path, capsys) -> None:
    """--home /var/lib/other: the unit runs with that home, and the next steps use it."""
    rc, path = install(tmp_path, "--home", "/var/lib/other")
    out = capsys.readouterr().out
    assert rc == 0
    text = path.read_text()
    assert "/var/lib/nodeclient" not in text and "/var/lib/nodeclient" not in out
    one = {k: v[0] for k, v in parse(text)["Service"].items()}
    assert one["ExecStart"] == f"{exe()} run --home /var/lib/other --log-format json"
    assert one["Environment"] == "NODECLIENT_HOME=/var/lib/other"
    assert one["StateDirectory"] == "other"
    assert "install -d -m 0700 -o nodeclient -g nodeclient /var/lib/other" in out


def test_a_home_flag_before_the_command_sets_the_units_home_too(tmp_path: Path) -> None:
    """`nodeclient --home /var/lib/other service install`: the flag every command takes
    before its name is the unit's home as well (before, the subcommand's own default reset
    it, and the unit silently got /var/lib/nodeclient)."""
    path = tmp_path / "nodeclient.service"
    assert main(["--home", "/var/lib/other", "service", "install", "--output", str(path)]) == 0
    one = {k: v[0] for k, v in parse(path.read_text())["Service"].items()}
    assert one["ExecStart"] == f"{exe()} run --home /var/lib/other --log-format json"


def test_an_executable_that_is_not_there_is_refused(tmp_path: Path, capsys) -> None:
    """--executable naming no executable file: a one-line error, no unit (systemd would
    fail with 203/EXEC at start; before, the unit was written and the command exited 0)."""
    rc, path = install(tmp_path, "--executable", str(tmp_path / "nope" / "nodeclient"))
    assert rc == 2 and not path.exists()
    assert "is not an executable file" in capsys.readouterr().err


def test_home_flag_outside_var_lib_is_refused(tmp_path: Path, capsys) -> None:
    """A --home that cannot be a StateDirectory= is refused, and no unit is written."""
    rc, path = install(tmp_path, "--home", "/srv/nodeclient")
    assert rc == 2 and not path.exists()
    assert "directly under /var/lib" in capsys.readouterr().err


def test_home_environment_does_not_move_the_units_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$NODECLIENT_HOME (this shell's home) is not the unit's: only --home changes it."""
    monkeypatch.setenv("NODECLIENT_HOME", str(tmp_path / "mine"))
    rc, path = install(tmp_path)
    assert rc == 0 and "run --home /var/lib/nodeclient " in path.read_text()


def test_bad_user_name_refused(tmp_path: Path, capsys) -> None:
    """A user name that could inject a line into the unit is refused, and nothing is written."""
    rc, path = install(tmp_path, "--user", "root\nExecStartPre=/bin/sh")
    assert rc == 2 and not path.exists()
    assert "not a valid system user name" in capsys.readouterr().err


def test_paths_with_spaces_refused() -> None:
    """Paths are written unquoted, so a space would split ExecStart=: refused."""
    with pytest.raises(UsageError, match="spaces or quotes"):
        service.UnitOptions(executable=Path("/opt/my tools/nodeclient"))


def test_unwritable_output_is_one_line_error(tmp_path: Path, capsys) -> None:
    """Writing where one cannot (a file in the way of the directory) is a one-line error."""
    (tmp_path / "blocker").write_text("")
    rc = main(["service", "install", "--output", str(tmp_path / "blocker" / "x.service")])
    assert rc == 2 and "cannot write" in capsys.readouterr().err


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify parses every directive without a complaint about our unit."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "install the systemd package for systemd-analyze"
    rc, path = install(tmp_path)
    assert rc == 0
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if path.name in line]
    assert proc.returncode == 0, proc.stderr
    assert complaints == []


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify step can fail: an unknown key in a copy of our unit is reported."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    _, path = install(tmp_path)
    path.write_text(path.read_text().replace("UMask=0077", "UMask=0077\nProtectEverything=yes"))
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "ProtectEverything" in proc.stderr


def test_configparser_reads_it_too(tmp_path: Path) -> None:
    """The unit is plain INI as tools other than systemd expect (no duplicate sections)."""
    _, path = install(tmp_path)
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read_string(path.read_text())
    assert cp.sections() == ["Unit", "Service", "Install"]


def test_protect_home_hides_homes_unless_the_code_lives_there() -> None:
    """ProtectHome=yes for a system-wide install; read-only when Python lives under /home."""
    system = service.UnitOptions(
        executable=Path("/usr/bin/nodeclient"), code_paths=(Path("/opt/venv"),)
    )
    assert "ProtectHome=yes\n" in service.render_unit(system)
    user = service.UnitOptions(
        executable=Path("/usr/bin/nodeclient"), code_paths=(Path("/home/op/.venv"),)
    )
    assert "ProtectHome=read-only\n" in service.render_unit(user)


def _private(base: Path) -> tuple[Path, Path]:
    """A script whose interpreter lives in a directory only its owner may enter."""
    private = base / "private"
    (private / "bin").mkdir(parents=True)
    real = private / "bin" / "python3.11"
    real.write_text("")
    private.chmod(0o700)
    venv = base / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").symlink_to(real)  # a virtual environment's interpreter is a link
    script = venv / "nodeclient"
    script.write_text(f"#!{venv / 'python3'}\n# a console script\n")
    script.chmod(0o755)
    return private, script


def test_an_interpreter_the_units_user_cannot_reach_is_refused(
    open_dir: Path, tmp_path: Path, capsys
) -> None:
    """The interpreter behind --executable (a venv's, linked to one under a private
    directory, as /root is 0700): the unit's user could not start it, so no unit is
    written and the error says where to install instead."""
    private, script = _private(open_dir)
    assert service.code_paths_for(script, ours=False) == (private / "bin",)
    rc, path = install(tmp_path, "--executable", str(script))
    err = capsys.readouterr().err
    assert rc == 2 and not path.exists()
    assert f"{private} (mode 0700, uid 0) keeps nodeclient from {private / 'bin'}" in err
    assert "203/EXEC" in err and "/usr/bin/python3 -m venv /opt/nodeclient" in err
    private.chmod(0o711)  # others may pass through: the unit can start
    assert install(tmp_path, "--executable", str(script))[0] == 0


def test_code_under_a_private_tmp_is_refused(
    tmp_path: Path, open_dir: Path, monkeypatch, capsys
) -> None:
    """PrivateTmp=yes gives the unit an empty /tmp and /var/tmp: a nodeclient installed
    there (or an interpreter reached through a link into one) would fail with 203/EXEC,
    so `service install` refuses it and names the directory."""
    monkeypatch.setattr(service, "PRIVATE_TMP_ROOTS", TMP_ROOTS)
    script = exe()  # the stand-in, in a directory under /tmp
    assert script.is_relative_to("/tmp")
    rc, path = install(tmp_path, "--executable", str(script))
    err = capsys.readouterr().err
    assert rc == 2 and not path.exists()
    assert f"{script} is under /tmp, which the unit's PrivateTmp=yes" in err
    assert "203/EXEC" in err
    assert service.under_private_tmp((Path("/usr/bin/python3"), Path("/var/tmp/x"))) is not None
    assert service.under_private_tmp((Path("/usr/bin/python3"), Path("/opt/x/bin"))) is None
    # A link from elsewhere into such a directory counts where it leads.
    hidden = open_dir / "hidden"
    (hidden / "bin").mkdir(parents=True)
    (open_dir / "link").symlink_to(hidden / "bin")
    monkeypatch.setattr(service, "PRIVATE_TMP_ROOTS", (hidden,))
    assert service.under_private_tmp((open_dir / "link",)) is not None
    assert service.under_private_tmp((open_dir,)) is None


def test_who_may_reach_a_path(open_dir: Path) -> None:
    """root reaches everything; a user that does not exist yet is judged by the other
    bits, an existing one by the owner's, the group's or the other bits as they apply."""
    private, _ = _private(open_dir)
    inside = private / "bin"
    assert service.unreachable("root", (inside,)) is None
    assert service.unreachable("no-such-user-x", (inside,)) is not None
    assert service.unreachable("nobody", (inside,)) is not None
    assert service.unreachable("nobody", (Path("/usr/bin"),)) is None
    private.chmod(0o701)
    assert service.unreachable("nobody", (inside,)) is None


def test_this_installs_code_paths_include_the_base_interpreter() -> None:
    """In a virtual environment sys.prefix is the venv: the interpreter it links to, and
    its standard library, live under sys.base_prefix, which must be reachable too."""
    assert Path(sys.base_prefix).resolve() in _CODE_PATHS()
    assert Path(sys.executable).resolve().parent in _CODE_PATHS()


# How systemd applies the unit's directives that cover /proc or /sys (systemd.exec(5)),
# as mounts in the service's mount namespace: read-only bind mounts over kernel tunables,
# /proc/kmsg made inaccessible, the cgroup tree read-only.
_KERNEL_MOUNTS = {
    "ProtectKernelTunables": "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys",
    "ProtectKernelLogs": "mount --bind /dev/null /proc/kmsg",
    "ProtectControlGroups": (
        "mount --bind /sys/fs/cgroup /sys/fs/cgroup && mount -o remount,bind,ro /sys/fs/cgroup"
    ),
}


def _bwrap_under(mounts: list[str], scratch: Path) -> subprocess.CompletedProcess[bytes]:
    """The worker's sandbox (as the unit's unprivileged user starts it) run under *mounts*,
    in a private mount namespace, as the unprivileged user nobody."""
    from nodeclient.node import sandbox

    layout = sandbox.Layout(
        workdir=scratch, cache_dir=scratch, read_only=(), python_path=(), tmp_bytes=None
    )
    argv = sandbox.bwrap_argv(layout, ["true"], env={"PATH": "/usr/bin:/bin"}, as_root=False)
    user = "setpriv --reuid=65534 --regid=65534 --clear-groups -- " + shlex.join(argv)
    script = " && ".join([*mounts, user])
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace and a user switch need root")
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is installed by .ci/run")
def test_the_sandbox_works_under_the_units_kernel_protections(
    tmp_path: Path, open_dir: Path
) -> None:
    """The unit's /proc and /sys protections, applied as systemd applies them, leave
    bubblewrap working for the unit's unprivileged user. ProtectKernelTunables= alone
    would not: the kernel refuses the sandbox's fresh /proc under a covered /proc/sys."""
    rc, path = install(tmp_path)
    assert rc == 0
    svc = parse(path.read_text())["Service"]
    mounts = [cmd for key, cmd in _KERNEL_MOUNTS.items() if svc.get(key) == ["yes"]]
    assert mounts  # ProtectControlGroups= at least
    scratch = open_dir / "work"
    scratch.mkdir(mode=0o777)
    scratch.chmod(0o777)
    done = _bwrap_under(mounts, scratch)
    assert done.returncode == 0, done.stderr.decode()
    refused = _bwrap_under([_KERNEL_MOUNTS["ProtectKernelTunables"]], scratch)
    assert refused.returncode != 0
    assert b"Can't mount proc" in refused.stderr, refused.stderr.decode()


def test_as_the_units_user_a_task_writes_only_its_work_dir_and_tmp(open_dir: Path) -> None:
    """Started by an unprivileged user (the unit's), bubblewrap makes its root and /dev
    tmpfs mounts the task's own uid's: writable and unbounded unless remounted
    read-only. Only the work directory and the bounded /tmp are writable. (Run as root,
    the test becomes the user nobody first; otherwise it is one already.)"""
    from nodeclient.node import sandbox

    scratch = open_dir / "work"
    scratch.mkdir(mode=0o777)
    scratch.chmod(0o777)
    layout = sandbox.Layout(
        workdir=scratch, cache_dir=scratch, read_only=(), python_path=(),
        tmp_bytes=1 << 20 if sandbox.tmpfs_size_supported() else None,
    )  # fmt: skip
    work = sandbox.INSIDE_WORK
    targets = ["/", "/dev", "/dev/shm", "/etc", str(work.parent), "/tmp", str(work)]
    probe = "; ".join(f"touch {t}/planted 2>/dev/null && echo {t}" for t in targets)
    argv = sandbox.bwrap_argv(
        layout, ["/bin/sh", "-c", probe], env={"PATH": "/usr/bin:/bin"}, as_root=False
    )
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["/tmp", str(work)]


def _pinned_unit() -> str:
    """The unit for fixed options: its SHA-256 is pinned per unit version below."""
    import hashlib

    opts = service.UnitOptions(
        executable=Path("/opt/nodeclient/bin/nodeclient"), code_paths=(Path("/opt/nodeclient"),)
    )
    return hashlib.sha256(service.render_unit(opts).encode()).hexdigest()


# The text of each unit version, as _pinned_unit() hashes it. A change to render_unit
# needs a new UNIT_VERSION (and its line here), so that upgraded nodes are told to install
# the unit again.
UNITS = {2: "0f25e62705fe6e2509f4ddee5c24897fbb2ae17ca3e73d29b8929d0531f053b7"}


def test_the_unit_text_is_the_one_recorded_for_its_version() -> None:
    assert _pinned_unit() == UNITS.get(service.UNIT_VERSION), (
        "render_unit's text changed: raise service.UNIT_VERSION and record the new text here"
    )


def test_an_older_unit_is_reported_with_what_to_do(tmp_path: Path) -> None:
    """A unit written before the version line (or with an older one) is outdated, with
    the commands that replace it; this release's, a foreign file and none are not."""
    opts = service.UnitOptions(executable=Path("/usr/bin/nodeclient"))
    current = service.render_unit(opts)
    unit = tmp_path / "nodeclient.service"
    unit.write_text(current)
    assert service.outdated_unit(unit) is None
    unit.write_text("\n".join(line for line in current.splitlines() if "unit version" not in line))
    said = service.outdated_unit(unit)
    assert said is not None
    assert "unit version 1, this release writes 2" in said
    assert "nodeclient service install" in said and "daemon-reload" in said
    unit.write_text(current.replace("unit version: 2", "unit version: 1"))
    assert service.outdated_unit(unit) is not None
    unit.write_text("[Service]\nExecStart=/usr/bin/other\n")
    assert service.outdated_unit(unit) is None
    assert service.outdated_unit(tmp_path / "none.service") is None


def _pip_launcher(script: Path, python: Path, *, quoted: bool) -> None:
    """A console script as pip writes it when the interpreter's path has a space or the
    ``#!`` line would pass 127 bytes: a shell script that executes Python on itself."""
    named = f'"{python}"' if quoted else str(python)
    script.write_text(
        f"#!/bin/sh\n'''exec' {named} \"$0\" \"$@\"\n' '''\n# -*- coding: utf-8 -*-\n"
        "import sys\nfrom nodeclient.entry import node\nsys.exit(node())\n"
    )
    script.chmod(0o755)


def test_a_pip_shell_launcher_is_followed_to_its_interpreter(
    open_dir: Path, tmp_path: Path, capsys
) -> None:
    """pip's ``#!/bin/sh`` launcher (a venv path with a space, or a long one) names its
    interpreter on the ``'''exec'`` line: service install judges that interpreter, and
    refuses one the unit's user cannot reach as it refuses it in a plain ``#!`` line."""
    private, plain = _private(open_dir)
    spaced = open_dir / "v e" / "bin"
    spaced.mkdir(parents=True)
    (spaced / "python").symlink_to(private / "bin" / "python3.11")
    launcher = spaced / "nodeclient"
    _pip_launcher(launcher, spaced / "python", quoted=True)
    long_dir = open_dir / ("d" * 130)
    long_dir.mkdir()
    (long_dir / "python").symlink_to(private / "bin" / "python3.11")
    long_launcher = long_dir / "nodeclient"
    _pip_launcher(long_launcher, long_dir / "python", quoted=False)
    for script in (plain, launcher, long_launcher):
        assert service.interpreter_of(script) == private / "bin" / "python3.11"
        assert service.code_paths_for(script, ours=False) == (private / "bin",)
    # --executable names a link without a space to the launcher in the spaced venv.
    linked = open_dir / "linked-nodeclient"
    linked.symlink_to(launcher)
    rc, path = install(tmp_path, "--executable", str(linked))
    err = capsys.readouterr().err
    assert rc == 2 and not path.exists()
    assert f"{private} (mode 0700, uid 0) keeps nodeclient from {private / 'bin'}" in err
    assert install(tmp_path, "--executable", str(plain))[0] == 2
    assert f"{private} (mode 0700, uid 0) keeps nodeclient" in capsys.readouterr().err
    private.chmod(0o711)
    assert install(tmp_path, "--executable", str(linked))[0] == 0
    # A #!/bin/sh script that is not pip's launcher still names /bin/sh.
    other = open_dir / "other"
    other.write_text('#!/bin/sh\nexec /usr/bin/python3 -m nodeclient "$@"\n')
    assert service.interpreter_of(other) == Path("/bin/sh").resolve()


def test_a_link_into_a_home_directory_keeps_homes_readable(
    open_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --executable outside the home roots that links into one: ProtectHome=yes would
    hide the link's target, so the unit gets ProtectHome=read-only. A home root that is
    itself a link counts where it leads too."""
    homes = open_dir / "home"
    monkeypatch.setattr(service, "_HOME_ROOTS", (homes,))
    target = homes / "op" / "bin" / "nodeclient"
    target.parent.mkdir(parents=True)
    target.write_text("#!/usr/bin/python3\n")
    target.chmod(0o755)
    link = open_dir / "bin" / "nodeclient"
    link.parent.mkdir()
    link.symlink_to(target)
    assert service.protect_home((link,)) == "read-only"
    assert service.protect_home((open_dir / "bin",)) == "yes"
    rc, path = install(tmp_path, "--executable", str(link))
    text = path.read_text()
    assert rc == 0 and "ProtectHome=read-only\n" in text
    assert f"ExecStart={link} run " in text
    monkeypatch.setattr(service, "_HOME_ROOTS", (open_dir / "homes-link",))
    (open_dir / "homes-link").symlink_to(homes)
    assert service.protect_home((target.parent,)) == "read-only"


def test_a_link_into_a_closed_directory_is_refused(open_dir: Path, tmp_path: Path, capsys) -> None:
    """An --executable that links into a directory the unit's user may not enter: the
    unit could not start it, so service install refuses it and names that directory."""
    closed = open_dir / "closed"
    closed.mkdir()
    script = closed / "nodeclient"
    script.write_text("#!/usr/bin/python3\n")
    script.chmod(0o755)
    closed.chmod(0o700)
    link = open_dir / "nc"
    link.symlink_to(script)
    assert service.unreachable("no-such-user-x", (link,)) is not None
    rc, path = install(tmp_path, "--executable", str(link))
    err = capsys.readouterr().err
    assert rc == 2 and not path.exists()
    assert f"{closed} (mode 0700, uid 0) keeps nodeclient from {script}" in err
    closed.chmod(0o711)
    assert install(tmp_path, "--executable", str(link))[0] == 0


def test_paths_that_are_not_utf8_are_refused(tmp_path: Path, capsys) -> None:
    """systemd reads unit files as UTF-8: an executable or home whose name is not valid
    UTF-8 is refused with the value named, and nothing is left in the output directory."""
    bad_exe = os.fsdecode(b"/opt/x/\xfe/nodeclient")
    bad_home = os.fsdecode(b"/var/lib/\xff")
    for flag, value in (("--executable", bad_exe), ("--home", bad_home)):
        rc, _ = install(tmp_path, flag, value)
        err = capsys.readouterr().err
        assert rc == 2 and "valid UTF-8" in err and repr(value) in err
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="valid UTF-8"):
        service.UnitOptions(executable=Path("/opt/\ud800/nodeclient"))  # a lone surrogate
    assert service.UnitOptions(executable=Path("/opt/nœud/nodeclient")).executable.name


def test_write_unit_leaves_no_temp_file_on_any_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither an encoding error nor an interrupt while writing leaves a temp file, and
    the unit in place stays as it was."""
    path = tmp_path / "nodeclient.service"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        service.write_unit(path, "ExecStart=/opt/\udcfe/nodeclient\n")
    assert [p.name for p in tmp_path.iterdir()] == ["nodeclient.service"]

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        service.write_unit(path, "[Unit]\n")
    assert [p.name for p in tmp_path.iterdir()] == ["nodeclient.service"]
    assert path.read_text() == "old"


@pytest.mark.parametrize(
    "name",
    ["my node.service", "nœud.service", "nodeclient", ".nodeclient.service",
     "nodeclient.service.bak", ".service", "a" * 248 + ".service"],
)  # fmt: skip
def test_output_names_systemd_cannot_load_are_refused(tmp_path: Path, capsys, name: str) -> None:
    """--output must be a unit name systemd loads (its characters, .service, at most 255
    characters, not hidden): anything else is refused and nothing is written."""
    rc = main(["service", "install", "--output", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc == 2 and "systemd loads as a unit" in err and "ending in .service" in err
    assert list(tmp_path.iterdir()) == []


def test_output_names_systemd_loads_are_written_and_quoted(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every character systemd allows in a unit name is accepted, up to 255 characters,
    and the printed commands quote the unit name and paths for the shell."""
    units = tmp_path / "units"
    units.mkdir()
    longest = "a" * 247 + ".service"
    assert main(["service", "install", "--output", str(units / longest)]) == 0
    assert (units / longest).is_file()
    # An executable with "&" in its path (here under the test's own /tmp, which the unit's
    # private /tmp and its user could not reach: those checks are not this test's).
    exe = tmp_path / "gpu&cpu" / "bin" / "nodeclient"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(service, "under_private_tmp", lambda paths: None)
    monkeypatch.setattr(service, "unreachable", lambda user, paths: None)
    name = "node\\x2dgpu_1:a-b.service"
    rc = main(["service", "install", "--output", str(units / name), "--executable", str(exe)])
    out = capsys.readouterr().out
    assert rc == 0 and (units / name).is_file()
    commands = [shlex.split(line, comments=True) for line in out.splitlines()[2:]]
    assert ["systemctl", "enable", "--now", name] in commands
    assert commands[-1][:4] == ["sudo", "-u", "nodeclient", str(exe)]
    assert sorted(p.name for p in units.iterdir()) == sorted([longest, name])


# --- the unit's daemon needs a coordinator: config.toml is where it finds one ------------------


def test_the_init_step_names_the_coordinator(tmp_path: Path, capsys) -> None:
    """The unit's ExecStart= has no --coordinator: the printed init writes one into
    config.toml (before, the steps made a home that names none, and the unit exited at
    every start, restarted every 10 s)."""
    home = f"/var/lib/nodeclient-absent-{os.getpid()}"  # no config.toml there yet
    rc, _ = install(tmp_path, "--home", home)
    out = capsys.readouterr().out
    assert rc == 0
    (init,) = [line for line in out.splitlines() if " init " in line]
    assert f"init --home {home} --wallet 0x... --coordinator https://" in init


@pytest.fixture
def unit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The unit's node home, here (a real one is under /var/lib): `service install` reads
    its config.toml from this directory."""
    home = tmp_path / "unit-home"
    home.mkdir(mode=0o700)
    read = service.read_home_config
    monkeypatch.setattr(service, "read_home_config", lambda _home: read(home))
    return home


def _config(home: Path, *lines: str) -> Path:
    path = home / "config.toml"
    path.write_text("\n".join(['wallet_address = "0x1111111111111111111111111111111111111111"',
                               *lines]) + "\n")  # fmt: skip
    path.chmod(0o600)
    return path


def test_a_home_whose_config_names_no_coordinator_is_warned_about(
    tmp_path: Path, unit_home: Path, capsys
) -> None:
    """An initialised home without a coordinator: the unit is written (it is harmless
    until enabled), with a warning and a step that say what to set, and where; init,
    which would refuse an initialised home, is not among the steps."""
    cfg = _config(unit_home, '# coordinator = "https://coordinator.example.net"')
    rc, path = install(tmp_path / "out")
    captured = capsys.readouterr()
    assert rc == 0 and path.exists()
    assert captured.err.startswith(f"nodeclient: warning: {cfg} names no coordinator")
    assert 'coordinator = "https://' in captured.err
    (step,) = [line for line in captured.out.splitlines() if str(cfg) in line]
    assert 'coordinator = "https://' in step
    assert " init " not in captured.out


def test_a_home_whose_config_names_a_coordinator_needs_no_step(
    tmp_path: Path, unit_home: Path, capsys
) -> None:
    _config(unit_home, 'coordinator = "https://coordinator.example.net"')
    rc, _ = install(tmp_path / "out")
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    assert " init " not in captured.out and "coordinator" not in captured.out
    assert "systemctl enable --now nodeclient.service" in captured.out


@pytest.mark.parametrize(
    "line", ['coordinator = "ftp://coordinator.example.net"', "coordinator = 5", "coordinator ="]
)
def test_a_coordinator_the_daemon_would_refuse_is_warned_about(
    tmp_path: Path, unit_home: Path, capsys, line: str
) -> None:
    cfg = _config(unit_home, line)
    rc, _ = install(tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 0 and err.startswith(f"nodeclient: warning: {cfg}: ")
    assert 'set coordinator = "https://' in err


def test_an_empty_home_flag_is_refused_not_taken_for_the_default(tmp_path: Path, capsys) -> None:
    """`service install --home "$DIR"` with DIR unset: refused (exit 2, no unit), as every
    other command refuses an empty --home, rather than a unit for /var/lib/nodeclient."""
    path = tmp_path / "nodeclient.service"
    assert main(["service", "install", "--home", "", "--output", str(path)]) == 2
    assert not path.exists()
    assert "--home is empty" in capsys.readouterr().err
