"""What a workflow run is made of: its retry policy, its status, the journal entries (the events of
the run's event-sourced agent), the state they fold into, and the messages the run agent handles.

A run's journal is its agent's event log (`state/_events.py`): one subject per run, appended with
the expected last sequence, so an owner that lost the run's shard cannot append any more.
"""

from __future__ import annotations

import random
from typing import Literal

import msgspec

RunState = Literal["running", "waiting", "completed", "failed", "compensated", "cancelled"]
TERMINAL = frozenset({"completed", "failed", "compensated", "cancelled"})


class Retry(msgspec.Struct, frozen=True):
    """How a step (or a compensation) is retried: at most `attempts` tries in all, the `k`-th
    retry after `min(max_interval, initial * factor**(k-1))` seconds scaled by a jitter factor
    drawn from [0.5, 1.5)."""

    attempts: int = 5
    initial: float = 1.0
    factor: float = 2.0
    max_interval: float = 100.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial < 0 or self.factor < 1 or self.max_interval < 0:
            raise ValueError(f"bad retry policy {self!r}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """The pause before the `retry`-th retry (1-based)."""
        base = min(self.max_interval, self.initial * self.factor ** max(0, retry - 1))
        return base * (0.5 + rng.random())


class WorkflowStatus(msgspec.Struct, kw_only=True):
    """What a run reports about itself (`handle.status()`)."""

    id: str
    state: str
    """`running`, `waiting` (a durable sleep or a signal), `completed`, `failed`,
    `compensated`, `cancelled`."""
    steps_done: int = 0
    """Journaled steps completed (`step`, `ask`, `now`, `random`, `uuid`)."""
    attempts: int = 0
    """Failed step attempts so far (each is journaled)."""
    error: str = ""
    """What ended the run (failed / compensated / cancelled), else the last step error."""
    version: int = 0
    type: str = ""


# -- journal entries (events of the run agent) -------------------------------------------------


class WfStarted(msgspec.Struct, tag=True, tag_field="entry"):
    input: bytes
    version: int
    at: float


class WfStep(msgspec.Struct, tag=True, tag_field="entry"):
    """Step `n` completed (`kind`: step, ask, now, random, uuid) with its msgpack result."""

    n: int
    name: str
    kind: str
    result: bytes
    at: float = 0.0
    undo: bool = False
    """The step registered a compensation (a cancel then has something to undo)."""


class WfStepFailed(msgspec.Struct, tag=True, tag_field="entry"):
    n: int
    name: str
    attempt: int
    error: str
    final: bool
    at: float = 0.0


class WfTimerSet(msgspec.Struct, tag=True, tag_field="entry"):
    n: int
    name: str
    due: float


class WfTimerFired(msgspec.Struct, tag=True, tag_field="entry"):
    n: int


class WfSignal(msgspec.Struct, tag=True, tag_field="entry"):
    id: str
    type: str
    body: bytes


class WfSignalTaken(msgspec.Struct, tag=True, tag_field="entry"):
    """`wait_signal` number `n` got signal `index` (-1: its timeout fired first)."""

    n: int
    index: int


class WfCompensation(msgspec.Struct, tag=True, tag_field="entry"):
    n: int
    name: str
    attempt: int
    ok: bool
    error: str = ""
    final: bool = True


class WfEnded(msgspec.Struct, tag=True, tag_field="entry"):
    state: str
    result: bytes = b""
    error: str = ""


class WfCancelling(msgspec.Struct, tag=True, tag_field="entry"):
    """`handle.cancel()` of a run with completed compensable steps: their compensations run
    (newest first, journaled, retried), then the run ends `cancelled`."""

    at: float


class WfRetried(msgspec.Struct, tag=True, tag_field="entry"):
    """`accord workflows retry`: the run goes on from its failed step; steps whose compensation
    ran are done again (their asks under new message ids)."""

    at: float


Entry = (
    WfStarted | WfStep | WfStepFailed | WfTimerSet | WfTimerFired | WfSignal | WfSignalTaken
    | WfCompensation | WfEnded | WfRetried | WfCancelling
)  # fmt: skip


class WfBatch(msgspec.Struct, tag=True, tag_field="entry"):
    """Several entries journaled in one append (one stream message): the ask steps a run
    completed since its last append, with the entry that made it append (a local step, a wait,
    the end). Folds exactly as its entries one after the other."""

    entries: list[Entry]


JOURNAL_TYPES: tuple[type, ...] = (
    WfStarted, WfStep, WfStepFailed, WfTimerSet, WfTimerFired, WfSignal, WfSignalTaken,
    WfCompensation, WfEnded, WfRetried, WfCancelling, WfBatch,
)  # fmt: skip


class Journal(msgspec.Struct):
    """The state of a run agent: its journal, folded (and kept whole, in order, in `entries`)."""

    started: bool = False
    input: bytes = b""
    version: int = 0
    started_at: float = 0.0
    steps: dict[int, WfStep] = msgspec.field(default_factory=dict)
    failures: dict[int, WfStepFailed] = msgspec.field(default_factory=dict)
    attempts: int = 0
    timers: dict[int, WfTimerSet] = msgspec.field(default_factory=dict)
    fired: list[int] = msgspec.field(default_factory=list)
    signals: list[WfSignal] = msgspec.field(default_factory=list)
    taken: dict[int, int] = msgspec.field(default_factory=dict)
    compensations: dict[int, WfCompensation] = msgspec.field(default_factory=dict)
    ended: WfEnded | None = None
    retries: int = 0
    cancelling: bool = False
    """A cancel is under way: compensations run, then the run ends `cancelled`."""
    entries: list[Entry] = msgspec.field(default_factory=list)

    def apply(self, ev: Entry | WfBatch) -> None:
        if isinstance(ev, WfBatch):
            for inner in ev.entries:
                self.apply(inner)
            return
        self.entries.append(ev)
        if isinstance(ev, WfStarted):
            self.started, self.input, self.version = True, ev.input, ev.version
            self.started_at = ev.at
        elif isinstance(ev, WfStep):
            self.steps[ev.n] = ev
        elif isinstance(ev, WfStepFailed):
            self.failures[ev.n] = ev
            self.attempts += 1
        elif isinstance(ev, WfTimerSet):
            self.timers[ev.n] = ev
        elif isinstance(ev, WfTimerFired):
            self.fired.append(ev.n)
        elif isinstance(ev, WfSignal):
            self.signals.append(ev)
        elif isinstance(ev, WfSignalTaken):
            self.taken[ev.n] = ev.index
        elif isinstance(ev, WfCompensation):
            if ev.ok or ev.final:
                self.compensations[ev.n] = ev
        elif isinstance(ev, WfEnded):
            self.ended = ev
        elif isinstance(ev, WfCancelling):
            self.cancelling = True
        elif isinstance(ev, WfRetried):
            self.ended = None
            self.retries += 1
            for n, comp in self.compensations.items():
                if comp.ok:
                    self.steps.pop(n, None)  # undone: to be done again
            self.compensations.clear()
            self.failures = {
                n: msgspec.structs.replace(f, final=False, attempt=0)
                for n, f in self.failures.items()
            }


# -- messages to the run agent -----------------------------------------------------------------


class WorkflowStart(msgspec.Struct):
    input: bytes


class WorkflowSignal(msgspec.Struct):
    id: str
    type: str
    body: bytes
    """msgpack (or JSON, when `json` is set: from the CLI)."""
    json: bool = False


class WorkflowCancel(msgspec.Struct):
    pass


class WorkflowRetry(msgspec.Struct):
    pass


class WorkflowQuery(msgspec.Struct):
    journal: bool = False


class WorkflowReport(msgspec.Struct):
    status: WorkflowStatus
    started: bool
    result: bytes = b""
    journal: Journal | None = None


class WorkflowTimerFired(msgspec.Struct):
    n: int


class WorkflowWake(msgspec.Struct):
    """The watchdog reminder of a running run: its delivery (re)activates the run."""


class WaitSignal(msgspec.Struct):
    n: int
    type: str
    due: float = 0.0


class WorkflowRecord(msgspec.Struct):
    """From a run's coroutine to its own agent: journal this (one turn, committed before the
    reply). `token` names the activation; another activation's record is refused."""

    token: str
    entries: list[Entry] = msgspec.field(default_factory=list)
    """Journaled in this turn, in order (several: one `WfBatch` append)."""
    wait: WaitSignal | None = None
    park: int = 0
    """> 0: the run now waits for its step `park` (its timer is stored): the watchdog goes off
    in this turn, unless the wait already ended; the turn that wakes the run turns it on."""
    arm: bool = False
    """Turn the watchdog on (a run resuming on a new activation)."""
