"""media.render: the frames of one job are capped when it is submitted (MAX_JOB_FRAMES).

The assembled result was the only thing bounded, by bytes: a job of a million 4x4 frames
is a few hundred bytes of payload and a 140 MB result, and the coordinator assembles it
frame by frame on its database thread (half a minute and gigabytes)."""

from __future__ import annotations

import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.workloads.render import make_request
from nodeclient.workloads.render_slices import MAX_JOB_FRAMES, job_meta

SCENE = b"BLENDER-v304 a tiny stand-in for a packed scene"
LIMIT = 32 << 20  # the coordinator's default payload limit


def _payload(first: int, last: int) -> bytes:
    return make_request(SCENE, frames=(first, last), width=4, height=4, samples=1).encode()


def test_the_frame_cap_is_a_hundred_thousand() -> None:
    """The documented figure."""
    assert MAX_JOB_FRAMES == 100_000


@pytest.mark.parametrize(("first", "last"), [(0, 999_999), (0, 100_000), (899_999, 999_999)])
def test_a_job_of_more_frames_is_refused_naming_the_limit(first: int, last: int) -> None:
    """One frame over is refused with the count, the range, the limit and what to do."""
    with pytest.raises(RemoteProtocolError) as info:
        job_meta(_payload(first, last), LIMIT)
    text = str(info.value)
    assert f"the job has {last - first + 1} frames ({first}..{last})" in text
    assert "over the limit of 100000 (MAX_JOB_FRAMES)" in text
    assert "split the range into several jobs" in text


def test_a_job_of_exactly_the_limit_is_accepted() -> None:
    meta = job_meta(_payload(900_000, 999_999), LIMIT)
    assert (meta["frame_start"], meta["frame_end"]) == (900_000, 999_999)
