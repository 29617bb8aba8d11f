"""A requester's own check of a job, through the public jobs API only
(``nodeclient-coordinator verify``; the devnet runs it on every demo job).

Nothing the coordinator says is taken on trust. For every task that has a result, its
raw bytes are fetched (``GET /v1/tasks/{id}/result``) and:

- the proof is recomputed with hashlib: SHA-256(task_id || result || node_id) (2.3.6),
  and the task's published ``result_sha256`` and ``result_size``, where given, must be
  those bytes';
- the EIP-712 ``Result`` message the node signed (the task's ``typed_data``) must name
  this task, this job, this node, that proof and the result's size, in this protocol's
  domain (and chain, when one is required), and the typed data must be exactly what this
  protocol gives for that message (its ``types``, ``EIP712Domain`` included: eth-account
  reads the domain's types from the typed data it is given);
- the signature must be in the one form the protocol accepts (65 bytes, v 27 or 28, low
  s: a high-s twin, or v 0 or 1, is refused, as the coordinator refuses it) and recover
  to the task's node_id, with this project's own recovery and again with eth-account,
  an implementation independent of it (2.3.7);
- what the node claimed when it was given the task: the signed manifest the task names
  (``manifest_hash``, ``GET /v1/manifests/{hash}``) must hash to that name and verify
  completely (schema, the tier its hardware gives, the RSA-PSS signature, the node's
  EIP-712 Registration, recovered again with eth-account), be the task's node's, and
  offer the job's workload class at the job's minimum tier or above (2.3.2).

Then the job: a succeeded job's result bytes must hash to its ``result_sha256``, and where
the job's result is a function of its tasks' results it is derived again here and must be
equal. It is read as it comes (:class:`StreamedResult`), hashed and compared with what it
must be chunk by chunk, and never read past that length: memory stays bounded whatever a
coordinator sends (a training job's, which the replay needs whole, is spooled to a
temporary file). A whole job's result is its one task's; a sliced render's is its slices
assembled in order by the same code the coordinator runs (``workloads/``), which needs the job's
parameters, so only when the requester gives the payload it submitted. A training job's
weights are replayed, given the payload: the coordinator's own round arithmetic
(``coordinator/rounds.py``) over the verified pseudo-gradients of every round, from the
job's initial weights, must give them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, cast

from nodeclient.coordinator import classes
from nodeclient.coordinator.client import NoAnswer, Unreachable
from nodeclient.errors import ManifestError, NodeClientError, ProtocolError, SignatureError
from nodeclient.protocol import eip712, manifest
from nodeclient.protocol.blobs import SHA256_HEX
from nodeclient.protocol.secp import parse_signature_hex

# A job's result is derived again from its tasks for these classes (see the module doc).
_WHOLE = frozenset({"ai.inference"})
_ASSEMBLED = frozenset({"media.render"})
_ROUNDS = frozenset({"ai.training"})
_ASSEMBLE_LIMIT = 1 << 40  # the requester's own payload: no size limit worth enforcing


class AuditError(NodeClientError):
    """A task or job does not verify."""


@dataclass(frozen=True)
class StreamedResult:
    """A job's result read as it comes (``CoordinatorClient.read_job_result``): *read*
    hands each chunk of it to the sink it is given. The audit hashes the chunks and
    compares them with what the result must be as they come, and stops the read (the sink
    raises) once the result is longer than that: a hostile coordinator's result of
    gigabytes is neither held in memory nor read whole."""

    read: Callable[[Callable[[bytes], object]], object]


def _hex(value: object) -> str:
    return str(value).lower()


def check_task(task: Mapping[str, Any], result: bytes, *, chain_id: int | None = None) -> str:
    """Check one task's result as a stranger would; the signer eth-account recovers.

    Raises AuditError naming the first check that fails.
    """
    tid = task.get("task_id")
    node = task.get("node_id")
    typed = task.get("typed_data")
    if not isinstance(node, str) or not isinstance(typed, Mapping) or not task.get("proof"):
        raise AuditError(f"task {tid}: no node, proof or signed message is published")
    try:
        task_bytes = uuid.UUID(str(tid)).bytes
        node_bytes = bytes.fromhex(node[2:])
        signature = parse_signature_hex(task.get("signature"))
    except (ValueError, SignatureError) as exc:
        raise AuditError(f"task {tid}: malformed task_id, node_id or signature") from exc
    proof = "0x" + hashlib.sha256(task_bytes + result + node_bytes).hexdigest()
    if _hex(task["proof"]) != proof:
        raise AuditError(f"task {tid}: the published proof is not SHA-256 of the result bytes")
    _check_published_result(task, result)
    message = typed.get("message")
    if not isinstance(message, Mapping):
        raise AuditError(f"task {tid}: the signed message is missing")
    domain = typed.get("domain")
    if not isinstance(domain, Mapping):
        domain = {}
    expected: dict[str, tuple[object, object]] = {
        "primaryType": ("Result", typed.get("primaryType")),
        "domain name": (eip712.DOMAIN_NAME, domain.get("name")),
        "domain version": (eip712.DOMAIN_VERSION, domain.get("version")),
        "task_id": ("0x" + task_bytes.hex(), _hex(message.get("task_id"))),
        "node_id": (node.lower(), _hex(message.get("node_id"))),
        "proof": (proof, _hex(message.get("proof"))),
        "result_size": (len(result), message.get("result_size")),
    }
    job_id = task.get("job_id")
    if job_id is not None:
        job_hex = "0x" + uuid.UUID(str(job_id)).bytes.hex()
        expected["job_id"] = (job_hex, _hex(message.get("job_id")))
    if chain_id is not None:
        expected["chainId"] = (chain_id, domain.get("chainId"))
    for name, (want, got) in expected.items():
        if want != got:
            raise AuditError(f"task {tid}: the signed message's {name} is {got!r}, not {want!r}")
    named = chain_id if chain_id is not None else domain.get("chainId")
    signed, chain = _protocol_result(tid, typed, named)
    try:  # the protocol's form of a signature: 65 bytes, v 27 or 28, low s (secp)
        ours = eip712.recover_typed("Result", signed, signature, chain_id=chain)
    except SignatureError as exc:
        raise AuditError(
            f"task {tid}: the signature is not one the protocol accepts ({exc}): the "
            "coordinator should have refused it"
        ) from exc
    signer = _recover(typed, signature)  # eth-account: an implementation not this project's
    for who in (ours, signer):
        if who.lower() != node.lower():
            raise AuditError(f"task {tid}: the signature recovers to {who}, not {node}")
    return signer


def _check_published_result(task: Mapping[str, Any], result: bytes) -> None:
    """The task's published result_sha256 and result_size, where given (a coordinator of
    this release always gives them), must be those of the result bytes it serves."""
    tid = task.get("task_id")
    published = task.get("result_sha256")
    digest = hashlib.sha256(result).hexdigest()
    if published is not None and published != digest:
        raise AuditError(
            f"task {tid}: its published result_sha256 is {published!r}, but the result "
            f"bytes served for it hash to {digest!r}"
        )
    size = task.get("result_size")
    if size is not None and (type(size) is not int or size != len(result)):
        raise AuditError(
            f"task {tid}: its published result_size is {size!r}, but {len(result)} result "
            "bytes are served for it"
        )


def _protocol_result(
    tid: object, typed: Mapping[str, Any], chain: object
) -> tuple[dict[str, Any], int]:
    """The task's signed Result message and *chain*, once *typed* is exactly the typed
    data this protocol gives for it on that chain (``eip712.typed_data_json``): its types
    (EIP712Domain included), primary type, domain and message, and nothing more.
    eth-account hashes what the typed data says, types and all, so typed data of other
    types could make another signature recover to the node."""
    if not isinstance(chain, int) or isinstance(chain, bool):
        raise AuditError(f"task {tid}: the signed message names no chain id")
    try:
        signed = eip712.message_from_json("Result", typed["message"])
        want = eip712.typed_data_json("Result", signed, chain_id=chain)
    except SignatureError as exc:
        raise AuditError(f"task {tid}: the signed message is not a Result: {exc}") from exc
    for key in sorted(set(want) | set(typed)):
        got, then = typed.get(key), want.get(key)
        if got != then:
            raise AuditError(
                f"task {tid}: the signed message's {key} are not this protocol's: "
                f"{str(got)[:200]}, not {str(then)[:200]}"
                if key == "types"
                else f"task {tid}: the signed message's typed data has {key} "
                f"{str(got)[:200]}, not this protocol's {str(then)[:200]}"
            )
    return signed, chain


# A manifest's freshness was the coordinator's to check when the node registered; the
# audit checks what it says and who signed it, whenever that was.
_ANY_TIME = 1 << 62


def check_manifest(
    task: Mapping[str, Any], signed: object, *, workload_class: str, min_tier: int
) -> None:
    """Check the manifest *signed* (``GET /v1/manifests/{hash}``) that *task* names, after
    :func:`check_task` passed: raises AuditError naming the first check that fails."""
    tid, node, want = task.get("task_id"), str(task.get("node_id")), task.get("manifest_hash")
    domain = task["typed_data"]["domain"]
    chain_id = domain.get("chainId") if isinstance(domain, Mapping) else None
    if not isinstance(chain_id, int) or isinstance(chain_id, bool):
        raise AuditError(f"task {tid}: the signed message names no chain id")
    if not isinstance(signed, Mapping):
        raise AuditError(f"task {tid}: the node's manifest is not a JSON object")
    issued = signed.get("issued_at")
    try:
        v = manifest.verify_manifest(
            signed,
            chain_id=chain_id,
            now=issued if isinstance(issued, int) else 0,
            max_skew=_ANY_TIME,
        )
    except ManifestError as exc:
        raise AuditError(f"task {tid}: the node's manifest does not verify: {exc}") from exc
    if v.manifest_hash.hex() != want:
        raise AuditError(f"task {tid}: the manifest served hashes to {v.manifest_hash.hex()}")
    if v.node_id.lower() != node.lower():
        raise AuditError(f"task {tid}: the manifest is node {v.node_id}'s, not {node}'s")
    registration = eip712.typed_data_json(
        "Registration",
        manifest.registration_message(signed, manifest.signed_bytes(signed)),
        chain_id=chain_id,
    )
    signer = _recover(registration, bytes.fromhex(str(signed["node_signature"])[2:]))
    if signer.lower() != node.lower():  # eth-account's own reading of node_signature
        raise AuditError(f"task {tid}: the manifest's node_signature recovers to {signer}")
    offered = signed["workload_classes"]
    if workload_class not in offered:
        raise AuditError(
            f"task {tid}: the node's manifest offers {', '.join(offered)}, not {workload_class}"
        )
    if signed["hardware_tier"] < min_tier:
        raise AuditError(
            f"task {tid}: the node's manifest says tier {signed['hardware_tier']}, and the "
            f"job asked for tier {min_tier} or above"
        )


def _recover(typed: Mapping[str, Any], signature: bytes) -> str:
    limit = sys.getrecursionlimit()
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    sys.setrecursionlimit(limit)  # py_ecc raises it on import: see nodeclient.node.keys
    try:
        signable = encode_typed_data(full_message=dict(typed))
        return str(Account.recover_message(signable, signature=signature))
    except Exception as exc:  # malformed typed data or signature: eth-account's own errors
        raise AuditError(f"the signature does not recover: {exc}") from exc


@dataclass
class TaskLine:
    task_id: str
    slice_index: int
    round: int
    status: str
    node_id: str | None
    ok: bool | None  # None: the task has no result to check
    detail: str
    proof: str | None = None
    # False: its result verified, but the coordinator publishes no manifest for it (one
    # before schema version 4): what its node claimed could not be checked.
    manifest_checked: bool = True


@dataclass
class JobReport:
    job_id: str
    workload_class: str
    status: str
    tasks: list[TaskLine] = field(default_factory=list)
    result: str = ""  # what was checked of the job's own result
    # True: derived again from the verified tasks; None: its hash only (a sliced job
    # without the payload); False: a check failed, or the job has no result
    result_ok: bool | None = None

    @property
    def ok(self) -> bool:
        """Every task with a result verified, and the job's result derived from them."""
        return (
            all(t.ok is not False and t.manifest_checked for t in self.tasks)
            and self.result_ok is True
        )

    @property
    def verdict(self) -> str:
        if self.ok:
            return "verified"
        if self.result_ok is not False and all(t.ok is not False for t in self.tasks):
            if self.result_ok is None:
                return "tasks verified; the result only by its hash"
            return "tasks and result verified; their nodes' manifests are not published"
        return "NOT VERIFIED"

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "workload_class": self.workload_class,
            "status": self.status,
            "verified": self.ok,
            "verdict": self.verdict,
            "tasks": [t.__dict__ for t in self.tasks],
            "result": {"ok": self.result_ok, "detail": self.result},
        }


def audit_job(
    job: Mapping[str, Any],
    fetch_task_result: Callable[[str], bytes],
    fetch_job_result: Callable[[], bytes] | StreamedResult,
    *,
    fetch_manifest: Callable[[str], object],
    job_id: str | None = None,
    payload: bytes | None = None,
    chain_id: int | None = None,
    submitted: Mapping[str, object] | None = None,
) -> JobReport:
    """Check every task of *job* (GET /v1/jobs/{id}) that has a result, then the job's
    result. *fetch_job_result*: the job's result (GET /v1/jobs/{id}/result), as it comes
    (a :class:`StreamedResult`: ``verify``), or as bytes already in memory (the devnet's
    small results). *fetch_manifest*: a node manifest by its hash (GET /v1/manifests/{hash}).
    *job_id*: the job asked for, which the answer must be (a coordinator could answer with
    another, genuine job). *chain_id*: the EIP-712 chain every signature must name; by
    default the one the job's first signed task names, so that all of a job's tasks name
    one chain. *submitted*: what the requester submitted (``min_tier``, ``slices``), which
    the coordinator's account of the job must match: nothing signs those fields, and the
    tasks' manifests are checked against the requester's, not the coordinator's."""
    if not isinstance(job, Mapping) or not isinstance(job.get("tasks", []), list):
        report = JobReport("?", "?", "?", result_ok=False)
        report.result = "the coordinator's answer is not a job with a list of tasks"
        return report
    report = JobReport(
        str(job.get("job_id")), str(job.get("workload_class")), str(job.get("status"))
    )
    try:
        asked = None if job_id is None else uuid.UUID(job_id)
        if asked is not None and uuid.UUID(report.job_id) != asked:
            report.result_ok = False
            report.result = f"the coordinator answered with job {report.job_id}, not {job_id}"
            return report
    except ValueError:
        report.result_ok = False
        report.result = f"malformed job_id {report.job_id!r}"
        return report
    # A render job's slices are what its split gives (tiles, frames per slice), not what
    # was submitted: only a training job's are the requester's number as it is.
    given = {
        name: value
        for name, value in (submitted or {}).items()
        if value is not None and (name != "slices" or report.workload_class in _ROUNDS)
    }
    differs = [
        f"the coordinator reports {name} {job.get(name)!r}, you submitted {value!r}"
        for name, value in given.items()
        if job.get(name) != value
    ]
    if differs:  # what the tasks are held to is the requester's, not the coordinator's
        job = {**job, **given}
    # A training job's results are fetched again, a round at a time, when it is replayed:
    # kept, they could come to MAX_STORED_BYTES (32 GiB) in the requester's memory.
    results = _Verified(fetch_task_result, keep=report.workload_class not in _ROUNDS)
    manifests: dict[str, object] = {}  # a node's manifest is fetched once for all its tasks
    claims = _Claims(job, fetch_manifest, manifests)
    chain_id = chain_id if chain_id is not None else _first_chain(job)
    for task in job.get("tasks") or []:
        line, data = _audit_task(task, report.job_id, fetch_task_result, chain_id, claims)
        report.tasks.append(line)
        if line.ok and line.status == "succeeded" and data is not None:
            results[line.task_id] = data
    if differs:
        report.result_ok = False
        report.result = "; ".join(differs)
    elif report.status == "succeeded":
        try:
            _check_job_result(report, job, results, fetch_job_result, payload)
        except (Unreachable, NoAnswer):
            raise  # the coordinator could not be asked: nothing is known
        except Exception as exc:  # noqa: BLE001 (whatever the answer made the checks raise)
            report.result_ok = False
            report.result = f"the result could not be checked: {type(exc).__name__}: {exc}"[:300]
    else:
        report.result_ok = False
        report.result = f"the job is {report.status}: there is no result to verify"
    return report


class _Verified(Mapping[str, bytes]):
    """The verified result bytes of a job's tasks, by task_id. With *keep* false only their
    SHA-256 is kept, and the bytes are fetched again when asked for, and must hash the same
    (else AuditError): memory then holds what the caller holds at once (a round)."""

    def __init__(self, fetch: Callable[[str], bytes], *, keep: bool) -> None:
        self._fetch, self._keep = fetch, keep
        self._held: dict[str, bytes] = {}  # task_id -> its bytes, or (not keep) their SHA-256

    def __setitem__(self, task_id: str, data: bytes) -> None:
        self._held[task_id] = data if self._keep else hashlib.sha256(data).digest()

    def __getitem__(self, task_id: str) -> bytes:
        held = self._held[task_id]
        if self._keep:
            return held
        data = self._fetch(task_id)
        if hashlib.sha256(data).digest() != held:
            raise AuditError(f"task {task_id}: its result changed between two fetches")
        return data

    def __contains__(self, task_id: object) -> bool:  # without fetching (Mapping's would)
        return task_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


def _first_chain(job: Mapping[str, Any]) -> int | None:
    """The EIP-712 chain id the job's first task with a signed message names, if any."""
    for task in job.get("tasks") or []:
        typed = task.get("typed_data") if isinstance(task, Mapping) else None
        domain = typed.get("domain") if isinstance(typed, Mapping) else None
        chain = domain.get("chainId") if isinstance(domain, Mapping) else None
        if isinstance(chain, int) and not isinstance(chain, bool):
            return chain
    return None


class _Unpublished(Exception):
    """The coordinator names no manifest for the task: nothing to check it against."""


@dataclass
class _Claims:
    """What a job's tasks are checked against: the job's class and minimum tier, and the
    manifests of the nodes that ran them (fetched once each)."""

    job: Mapping[str, Any]
    fetch: Callable[[str], object]
    cache: dict[str, object]

    def check(self, task: Mapping[str, Any]) -> None:
        tid, digest = task.get("task_id"), task.get("manifest_hash")
        if digest is None:  # a coordinator before schema 4, or a task leased before it
            raise _Unpublished
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise AuditError(f"task {tid}: malformed manifest_hash {digest!r}")
        min_tier = self.job.get("min_tier")
        if not isinstance(min_tier, int) or isinstance(min_tier, bool):
            raise AuditError(f"the job's min_tier {min_tier!r} is not an integer")
        if digest not in self.cache:
            try:
                self.cache[digest] = self.fetch(digest)
            except ProtocolError as exc:
                raise AuditError(
                    f"task {tid}: its node's manifest could not be fetched: {exc}"
                ) from exc
        check_manifest(
            task, self.cache[digest],
            workload_class=str(self.job.get("workload_class")), min_tier=min_tier,
        )  # fmt: skip


def _audit_task(  # noqa: PLR0911 (one early answer per check)
    task: Mapping[str, Any],
    job_id: str,
    fetch: Callable[[str], bytes],
    chain_id: int | None,
    claims: _Claims,
) -> tuple[TaskLine, bytes | None]:
    """One task's line, and its result bytes when they verified."""
    try:
        line = TaskLine(
            str(task["task_id"]), int(task["slice_index"]), int(task.get("round") or 0),
            str(task["status"]), task.get("node_id"), None, "no result", task.get("proof"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Infinity: OverflowError
        return TaskLine(str(task)[:60], -1, -1, "?", None, False, f"malformed task: {exc!r}"), None
    if not task.get("proof"):
        return line, None
    try:
        data = fetch(line.task_id)
        check_task({**task, "job_id": job_id}, data, chain_id=chain_id)
    except AuditError as exc:
        line.ok, line.detail = False, str(exc)
        return line, None
    except (Unreachable, NoAnswer):
        raise  # the coordinator could not be asked: nothing is known
    except ProtocolError as exc:  # e.g. a task said done whose result is refused
        line.ok, line.detail = False, f"its result could not be fetched: {exc}"
        return line, None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # malformed fields
        line.ok, line.detail = False, f"malformed task: {exc!r}"
        return line, None
    if line.status != "succeeded":
        # A coordinator accepts a result and marks its task succeeded in one step, and
        # never ends a succeeded task otherwise: a signed, verified result published under
        # another status is one the coordinator chose to leave out (of a training round's
        # average, say), which the job's replay would then follow.
        line.ok = False
        line.detail = f"proof and signature verified, but the task is published as {line.status}"
        return line, None
    try:
        claims.check(task)
    except _Unpublished:
        line.ok, line.manifest_checked = True, False
        line.detail = (
            "proof and signature verified; its node's manifest is not published (a task "
            "leased by a coordinator before schema version 4), so not checked"
        )
        return line, data
    except AuditError as exc:
        line.ok, line.detail = False, str(exc)
        return line, None
    except (Unreachable, NoAnswer):
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # malformed fields
        line.ok, line.detail = False, f"malformed manifest: {exc!r}"
        return line, None
    line.ok, line.detail = True, "proof, signature and its node's manifest verified"
    return line, data


class _TooLong(Exception):
    """The job's result went past the length it must have: it is not read further."""


@dataclass
class _Read:
    """What was read of a job's result: its SHA-256 and size; whether it equals the bytes
    it was compared with, chunk by chunk (None: there were none to compare with); False
    for *whole* when it went past their length (then neither hash nor size is known)."""

    sha256: str = ""
    size: int = 0
    equal: bool | None = None
    whole: bool = True


def _read_job_result(
    fetch: Callable[[], bytes] | StreamedResult,
    expected: bytes | None,
    spool: IO[bytes] | None,
) -> _Read:
    """Read the job's result once: hashed, compared with *expected* (when known) as it
    comes and never read past its length, and written to *spool* (when given, for a
    replay that needs it whole). Memory holds a chunk at a time, whatever is sent."""
    digest = hashlib.sha256()
    got = _Read(equal=None if expected is None else True)
    want = None if expected is None else memoryview(expected)

    def sink(chunk: bytes) -> None:
        end = got.size + len(chunk)
        if want is not None:
            if end > len(want):
                raise _TooLong
            got.equal = got.equal and want[got.size : end] == chunk
        digest.update(chunk)
        if spool is not None:
            spool.write(chunk)
        got.size = end

    try:
        if isinstance(fetch, StreamedResult):
            fetch.read(sink)
        else:
            sink(fetch())
    except _TooLong:
        got.whole, got.equal = False, False
        return got
    got.sha256 = digest.hexdigest()
    if want is not None and got.size != len(want):
        got.equal = False  # shorter
    return got


def _check_job_result(
    report: JobReport,
    job: Mapping[str, Any],
    results: Mapping[str, bytes],
    fetch: Callable[[], bytes] | StreamedResult,
    payload: bytes | None,
) -> None:
    """Check the job's result against what its verified tasks give. What it must be is
    derived first, where it can be (an inference job's one task's result, a render's
    slices assembled), so that the result is compared with it as it is read."""
    done = [t for t in job["tasks"] if t["status"] == "succeeded"]
    done.sort(key=lambda t: (t.get("round") or 0, t["slice_index"]))
    wclass = report.workload_class
    derivable = (
        bool(done)
        and all(t["task_id"] in results for t in done)
        and wclass in _WHOLE | _ASSEMBLED | _ROUNDS
    )
    meta, expected = _derive(report, job, done, results, payload) if derivable else (None, None)
    if report.result_ok is False:
        return
    replay = derivable and wclass in _ROUNDS and payload is not None and meta is not None
    with tempfile.TemporaryFile() if replay else contextlib.nullcontext() as spool:
        got = _read_job_result(fetch, expected, spool)
        if not got.whole:
            report.result_ok = False
            report.result = (
                f"not equal to {_derived(report, done)}: longer than its "
                f"{len(expected or b'')} bytes (not read further)"
            )
        elif got.sha256 != job.get("result_sha256"):
            report.result_ok = False
            report.result = f"result bytes hash to {got.sha256}, not the published result_sha256"
        elif not done:
            report.result_ok = False
            report.result = "the job lists no succeeded task to derive its result from"
        elif any(t["task_id"] not in results for t in done):
            report.result_ok = False
            report.result = "result_sha256 matches, but not every succeeded task verified"
        elif not derivable:
            report.result_ok = False
            report.result = f"workload class {wclass!r} is not one whose result this check derives"
        else:
            _judge(report, job, done, results, got=got, expected=expected, payload=payload,
                   meta=meta, spool=spool)  # fmt: skip


def _derived(report: JobReport, done: list[Mapping[str, Any]]) -> str:
    """What the job's result must be equal to, in words."""
    if report.workload_class in _WHOLE:
        return "its one task's verified result"
    return f"its {len(done)} verified slices assembled in order"


def _derive(
    report: JobReport,
    job: Mapping[str, Any],
    done: list[Mapping[str, Any]],
    results: Mapping[str, bytes],
    payload: bytes | None,
) -> tuple[Any, bytes | None]:
    """The payload's metadata (None without it) and what the job's result must be, where
    it is known before it is read: an inference job's one task's result; a render's
    slices assembled, given the payload. A job that cannot be verified whatever its
    result (a render job that does not list each slice once) is reported here."""
    wclass = report.workload_class
    wc = classes.lookup(wclass)
    # The class the coordinator names must be the payload's.
    meta = None if payload is None else wc.validate(payload, _ASSEMBLE_LIMIT)
    if wclass in _WHOLE:
        return meta, results[done[0]["task_id"]] if len(done) == 1 else None
    if wclass not in _ASSEMBLED or payload is None or meta is None:
        return meta, None
    indices = [t["slice_index"] for t in done]  # the coordinator's count, not trusted
    if len(indices) != int(job["slices"]) or indices != list(range(len(indices))):
        report.result_ok = False
        report.result = f"the job does not list each of its {job['slices']} slices once"
        return meta, None
    parts = [results[t["task_id"]] for t in done]
    for part in parts:  # each slice's own signed header: your scene, size and frames
        wc.check_result(part, meta, _ASSEMBLE_LIMIT)
    return meta, wc.assemble(parts, meta)


def _judge(
    report: JobReport,
    job: Mapping[str, Any],
    done: list[Mapping[str, Any]],
    results: Mapping[str, bytes],
    *,
    got: _Read,
    expected: bytes | None,
    payload: bytes | None,
    meta: Any,
    spool: IO[bytes] | None,
) -> None:
    """The job's result, read whole and hashing to its result_sha256, against what its
    verified tasks give."""
    wclass, derived = report.workload_class, _derived(report, done)
    if wclass in _WHOLE:
        same = expected is not None and got.equal is True
        report.result_ok = same
        report.result = f"equal to {derived}" if same else f"not equal to {derived}"
        if same and expected is not None and payload is not None:  # from the model you sent
            from nodeclient.workloads import inference

            request = inference.InferenceRequest.decode(payload)
            inference.decode_result(
                expected, max_bytes=len(expected), expected_model_sha256=request.model_sha256,
                expected_outputs=request.output_names,
            )  # fmt: skip
            # The signed Result covers the result's bytes, not the input the node was sent.
            report.result += ", from your model, with the outputs you asked for"
    elif payload is None or meta is None:
        report.result = "result_sha256 matches; give --payload to " + (
            "assemble it from its slices" if wclass in _ASSEMBLED else "replay its rounds"
        )
    elif wclass in _ASSEMBLED:
        report.result_ok = got.equal is True
        report.result = (
            f"equal to {derived}"
            if report.result_ok
            else f"not equal to {derived} (or the payload is not the one submitted)"
        )
    elif spool is not None:
        report.result_ok, report.result = _replay_spooled(payload, job, results, spool)


def _replay_spooled(
    payload: bytes, job: Mapping[str, Any], results: Mapping[str, bytes], spool: IO[bytes]
) -> tuple[bool, str]:
    """:func:`_replay_training` over the job's result as spooled: mapped from its file, so
    that the final weights are read from the page cache, not copied into memory."""
    spool.flush()
    if spool.tell() == 0:  # an empty file cannot be mapped
        return _replay_training(payload, job, results, b"")
    data = mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        # A read-only map reads as bytes do where the result is decoded (sliced, and
        # viewed by numpy without a copy).
        return _replay_training(payload, job, results, cast(bytes, data))
    finally:
        # Arrays still viewing it (held by an exception's traceback) keep it open: it is
        # then closed when they go.
        with contextlib.suppress(BufferError):
            data.close()


def _metrics_differ(got: Any, want: Mapping[str, Any]) -> str | None:
    """How a round's published metrics differ from the replay's (None: they agree): which
    slices were used, dropped and clipped exactly; norms and losses within float noise."""
    if not isinstance(got, dict):
        return "they are not an object"
    for key in ("round", "base_sha256", "used", "clipped"):
        if got.get(key) != want[key]:
            return f"{key} is {got.get(key)!r}, the replay gives {want[key]!r}"
    dropped = got.get("dropped")
    slices = [d.get("slice") if isinstance(d, dict) else d for d in dropped or ()]
    expected = [d["slice"] for d in want["dropped"]]
    if not isinstance(dropped, list) or slices != expected:
        return f"dropped slices are {slices}, the replay drops {expected}"
    norms = got.get("norms")
    if not isinstance(norms, dict) or set(norms) != set(want["norms"]):
        return f"norms are given for slices {sorted(norms or ())}, not {sorted(want['norms'])}"
    pairs = [(f"norms[{k}]", norms[k], v) for k, v in want["norms"].items()]
    pairs += [(key, got.get(key), want[key]) for key in ("first_loss", "last_loss")]
    for what, x, y in pairs:
        close = (x is None and y is None) or (
            isinstance(x, int | float) and y is not None and math.isclose(x, y, rel_tol=1e-5)
        )
        if not close:
            return f"{what} is {x!r}, the replay gives {y!r}"
    return None


def _replay_training(  # noqa: PLR0911 (one early answer per check)
    payload: bytes, job: Mapping[str, Any], results: Mapping[str, bytes], data: bytes
) -> tuple[bool, str]:
    """Run the coordinator's own round arithmetic (coordinator/rounds.py: checks, outlier
    rejection, clipping, mean, outer step) over the verified pseudo-gradients, from the
    job's initial weights; the job's final weights must come out (within float32 noise)."""
    import numpy as np

    from nodeclient.coordinator import rounds
    from nodeclient.workloads import training as tr

    request = tr.JobRequest.decode(payload, max_bytes=_ASSEMBLE_LIMIT)
    model, config = request.model, request.config
    slices = int(job["slices"])
    shards = [tr.sha256_hex(shard) for shard in request.shards(slices)]
    container = request.initial_weights()
    weights = dict(tr.decode_weights(container, model, max_bytes=_ASSEMBLE_LIMIT))
    momentum = {k: np.zeros(s, np.float32) for k, s in model.parameter_shapes().items()}
    base = tr.sha256_hex(container)
    final, published = tr.decode_final(data, max_bytes=len(data))
    if len(published) != config.rounds:
        return False, f"it publishes the metrics of {len(published)} rounds, not {config.rounds}"
    for r in range(config.rounds):
        tasks = [t for t in job["tasks"] if (t.get("round") or 0) == r]
        if sorted(int(t["slice_index"]) for t in tasks) != list(range(slices)):
            return False, f"round {r} does not list each of its {slices} slices once"
        subs = [
            rounds.Submission(
                int(t["slice_index"]), shards[int(t["slice_index"])],
                results.get(str(t["task_id"])) if t["status"] == "succeeded" else None,
                str(t.get("reason") or t["status"]),
            )
            for t in tasks
        ]  # fmt: skip
        outcome = rounds.aggregate(
            subs, shapes=model.parameter_shapes(), base_sha256=base, config=config
        )
        if outcome.delta is None:
            return False, f"round {r} has no valid pseudo-gradient when replayed"
        differs = _metrics_differ(published[r], outcome.metrics(r, base))
        if differs is not None:
            return False, f"round {r}'s published metrics are not the replay's: {differs}"
        weights, momentum = rounds.outer_step(weights, momentum, outcome.delta, config.outer)
        base = tr.sha256_hex(tr.weights_container(weights))
    if set(final) != set(weights) or any(final[k].shape != weights[k].shape for k in weights):
        return False, "its weights are not the payload's model's parameters"
    worst = max(float(np.max(np.abs(final[k] - weights[k]), initial=0.0)) for k in weights)
    # The same arithmetic as the coordinator's: equal but for the last bits a machine's
    # other summation order may give.
    if not all(np.allclose(final[k], weights[k], rtol=1e-6, atol=1e-9) for k in weights):
        return False, f"not the weights its {config.rounds} rounds replay to (off by {worst:.3g})"
    return True, (
        f"equal to its {config.rounds} rounds replayed from the verified pseudo-gradients"
        f" (largest difference {worst:.3g})"
    )
