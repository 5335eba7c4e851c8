"""FailureDetector driven by a fake clock: every state transition without a single sleep."""

from __future__ import annotations

import pytest

from accord.cluster._detector import FailureDetector, State, Transition

SUSPECT_AFTER = 0.75
DEAD_AFTER = 1.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fd(clock: FakeClock) -> FailureDetector:
    return FailureDetector(
        "observer",
        suspect_after=SUSPECT_AFTER,
        dead_after=DEAD_AFTER,
        clock=clock,
        wall=lambda: 42.0,
    )


def moves(transitions: list[Transition]) -> list[tuple[str, str, str]]:
    return [(t.node, t.old, t.new) for t in transitions]


def test_rejects_thresholds_out_of_order(clock: FakeClock) -> None:
    for suspect, dead in [(0, 1), (1, 1), (2, 1), (-1, 1)]:
        with pytest.raises(ValueError):
            FailureDetector("o", suspect_after=suspect, dead_after=dead, clock=clock, wall=clock)


def test_first_heartbeat_joins_as_alive(fd: FailureDetector) -> None:
    out = fd.heartbeat("a", "inc1")
    assert moves(out) == [("a", "unknown", "alive")]
    assert out[0].observer == "observer"
    assert out[0].reason == "joined"
    assert out[0].at == 42.0  # wall time, not the monotonic clock
    assert fd.state("a") is State.ALIVE
    assert fd.live() == ["a"]
    assert fd.state("never-seen") is None


def test_repeated_heartbeats_of_an_alive_member_are_silent(
    fd: FailureDetector, clock: FakeClock
) -> None:
    fd.heartbeat("a", "inc1")
    for _ in range(10):
        clock.advance(SUSPECT_AFTER * 0.9)
        assert fd.heartbeat("a", "inc1") == []
        assert fd.tick() == []
    assert fd.state("a") is State.ALIVE


def test_suspect_only_after_suspect_after(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(SUSPECT_AFTER)  # exactly at the threshold: not yet
    assert fd.tick() == []
    clock.advance(0.01)
    out = fd.tick()
    assert moves(out) == [("a", "alive", "suspect")]
    assert fd.state("a") is State.SUSPECT
    assert fd.tick() == []  # no repeated transition


def test_suspect_still_counts_as_live(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(SUSPECT_AFTER + 0.01)
    fd.tick()
    assert fd.state("a") is State.SUSPECT
    assert fd.live() == ["a"]


def test_dead_after_dead_after(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(SUSPECT_AFTER + 0.01)
    fd.tick()
    clock.advance(DEAD_AFTER - SUSPECT_AFTER - 0.01)  # silent for exactly dead_after
    assert fd.tick() == []
    clock.advance(0.01)
    assert moves(fd.tick()) == [("a", "suspect", "dead")]
    assert fd.state("a") is State.DEAD
    assert fd.live() == []
    assert fd.tick() == []


def test_long_silence_goes_through_suspect_to_dead_in_one_tick(
    fd: FailureDetector, clock: FakeClock
) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(DEAD_AFTER * 10)
    assert moves(fd.tick()) == [("a", "alive", "suspect"), ("a", "suspect", "dead")]


def test_heartbeat_resumed_turns_suspect_back_to_alive(
    fd: FailureDetector, clock: FakeClock
) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(SUSPECT_AFTER + 0.1)
    fd.tick()
    out = fd.heartbeat("a", "inc1")
    assert moves(out) == [("a", "suspect", "alive")]
    assert out[0].reason == "heartbeat resumed"
    # the silence is measured from the resumed beat again
    clock.advance(SUSPECT_AFTER)
    assert fd.tick() == []


def test_dead_member_whose_heartbeat_resumes_rejoins(fd: FailureDetector, clock: FakeClock) -> None:
    """A paused process (SIGSTOP, GC, partition) that beats again with the same incarnation comes
    back as alive (it fenced itself meanwhile, so it may rejoin placement)."""
    fd.heartbeat("a", "inc1")
    clock.advance(DEAD_AFTER + 0.1)
    fd.tick()
    assert fd.state("a") is State.DEAD
    assert fd.live() == []
    out = fd.heartbeat("a", "inc1")
    assert moves(out) == [("a", "dead", "alive")]
    assert out[0].reason == "heartbeat resumed after death"
    assert fd.live() == ["a"]
    clock.advance(SUSPECT_AFTER)  # judged again from the resumed beat
    assert fd.tick() == []


def test_new_incarnation_rejoins_a_dead_member(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(DEAD_AFTER + 0.1)
    fd.tick()
    out = fd.heartbeat("a", "inc2")
    assert moves(out) == [("a", "dead", "alive")]
    assert out[0].reason == "joined"
    assert fd.state("a") is State.ALIVE
    assert fd.live() == ["a"]
    # the fresh member is judged from its own first beat
    clock.advance(SUSPECT_AFTER)
    assert fd.tick() == []


def test_leaving_member_is_excluded_from_live_but_still_alive(fd: FailureDetector) -> None:
    fd.heartbeat("a", "inc1")
    fd.heartbeat("b", "inc1")
    assert fd.live() == ["a", "b"]
    assert fd.heartbeat("a", "inc1", leaving=True) == []
    assert fd.state("a") is State.ALIVE
    assert fd.live() == ["b"]
    assert fd.members() == {"a": State.ALIVE, "b": State.ALIVE}


def test_member_joining_already_leaving_is_never_live(fd: FailureDetector) -> None:
    fd.heartbeat("a", "inc1", leaving=True)
    assert fd.state("a") is State.ALIVE
    assert fd.live() == []


def test_departed_moves_to_left_once(fd: FailureDetector) -> None:
    fd.heartbeat("a", "inc1")
    out = fd.departed("a", "member entry removed")
    assert moves(out) == [("a", "alive", "left")]
    assert out[0].reason == "member entry removed"
    assert fd.state("a") is State.LEFT
    assert fd.live() == []
    assert fd.departed("a", "again") == []
    assert fd.departed("unknown", "never seen") == []


def test_departed_member_ignores_its_own_late_beat_but_rejoins_with_new_incarnation(
    fd: FailureDetector,
) -> None:
    fd.heartbeat("a", "inc1")
    fd.departed("a", "gone")
    assert fd.heartbeat("a", "inc1") == []
    assert fd.state("a") is State.LEFT
    assert moves(fd.heartbeat("a", "inc2")) == [("a", "left", "alive")]


def test_dead_member_cannot_depart(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    clock.advance(DEAD_AFTER + 1)
    fd.tick()
    assert fd.departed("a", "late delete") == []
    assert fd.state("a") is State.DEAD


def test_members_are_judged_independently(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heartbeat("a", "inc1")
    fd.heartbeat("b", "inc1")
    clock.advance(SUSPECT_AFTER + 0.1)
    fd.heartbeat("b", "inc1")
    assert moves(fd.tick()) == [("a", "alive", "suspect")]
    assert fd.members() == {"a": State.SUSPECT, "b": State.ALIVE}
    assert fd.live() == ["a", "b"]
