"""Preemption: what a rank does when the scheduler wants the machine back.

SLURM (``--signal=TERM@120``, ``scancel``, preemption), Kubernetes (pod deletion) and spot instances send SIGTERM
and, after a grace period, SIGKILL.  Every rank installs :class:`Preemption`:

- the first SIGTERM or SIGINT only sets a flag.  The trainer reads it once per optimizer step in the same small
  all-reduce that checks the step for non-finite values (engine/guard.py), so one signalled rank is enough: every
  rank finishes its current step, they save one checkpoint of that step together, ``latest`` names it, and the
  process exits with :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), which the launchers pass on.
  ``--resume auto`` continues exactly there.
- a second signal (more than :data:`SAME_SIGNAL_S` after the first: one signal delivered both to the process
  group and again by a launcher that forwards it counts once), or the deadline ``--train.save_grace_s`` counted
  from the first signal, aborts: the rank prints one line and exits 128+signal at once.  A save cut short
  this way is invisible (checkpoints become visible only by an atomic rename, engine/checkpoint.py) and the
  previous checkpoint stays the one ``latest`` names.
- the rank's launcher disappearing counts as a signal: a rank whose parent (DeepSpeed's per-node launcher,
  torchrun's agent) or whose launcher's parent (the ``deepspeed`` runner) exits stops at the next step boundary
  instead of carrying on orphaned.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 75          # sysexits.h EX_TEMPFAIL: stopped on a signal with its checkpoint saved; requeue
SAME_SIGNAL_S = 2.0          # a repeat within this window is the same signal arriving by another path
WATCH_PERIOD_S = 1.0


class Preempted(Exception):
    """Raised by the trainer once the preemption checkpoint is saved (exit EXIT_PREEMPTED)."""

    def __init__(self, step: int, reason: str, saved: str | None):
        super().__init__(reason)
        self.step, self.reason, self.saved = step, reason, saved


def _say(msg: str) -> None:
    """Write one line from a signal handler or a thread (print() is not reentrant)."""
    try:
        os.write(2, (msg.rstrip("\n") + "\n").encode())
    except OSError:
        pass


def _ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class Preemption:
    """Signal handling and launcher watch for one rank; read ``requested`` once per step."""

    def __init__(self, grace_s: float = 0.0, rank: int = 0):
        self.grace_s, self.rank = grace_s, rank
        self.reason: str | None = None      # "SIGTERM", "SIGINT", "launcher exit"
        self.signum = signal.SIGTERM
        self.first_at: float | None = None
        self.done = False                   # the preemption checkpoint is saved: later signals change nothing
        self._timer: threading.Timer | None = None
        self._previous: dict = {}
        self._watching = False

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    # ------------------------------------------------------------------------------------------ install
    def install(self, watch_launcher: bool = True) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if watch_launcher and os.path.isdir("/proc") and "LOCAL_RANK" in os.environ:
            self._start_watch()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous = {}
        self._watching = False
        self.cancel_deadline()

    # ------------------------------------------------------------------------------------------ events
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.done:
            return
        if self.first_at is None or self.reason == "launcher exit":
            self.signum = signum
            self.request(name)
        elif now - self.first_at > SAME_SIGNAL_S:
            self.abort(f"second {name}")

    def request(self, reason: str) -> None:
        """Ask for a stop at the next step boundary (idempotent)."""
        if self.done:
            return
        first = self.first_at is None
        self.reason = reason
        if first:
            self.first_at = time.monotonic()
            if self.rank == 0:
                grace = f" within {self.grace_s:g} s (--train.save_grace_s)" if self.grace_s > 0 else ""
                _say(f"[engine] {reason}: finishing the current step and saving a checkpoint{grace}; "
                     "a second signal aborts")
            self.start_deadline()

    def agreed(self) -> None:
        """The ranks agreed to stop (this rank may not have been signalled itself): start its deadline too."""
        if self.reason is None:
            self.reason = "another rank was signalled"
            self.first_at = time.monotonic()
        self.start_deadline()

    def finish(self) -> None:
        """The preemption checkpoint is saved: ignore later signals (a launcher forwarding them as it ends)."""
        self.done = True
        self.cancel_deadline()

    def start_deadline(self) -> None:
        if self.grace_s > 0 and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self.abort,
                                          args=(f"--train.save_grace_s {self.grace_s:g} s passed",))
            self._timer.daemon = True
            self._timer.start()

    def cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self, why: str) -> None:
        """Leave now, without finishing the save: the partial checkpoint stays invisible."""
        if self.done:
            return
        _say(f"error: {why} after {self.reason or 'a signal'}: aborting without saving (rank {self.rank}); "
             "the previous checkpoint is intact, continue with --resume auto")
        try:
            sys.stdout.flush()
        except Exception:       # noqa: BLE001 - we are leaving anyway
            pass
        os._exit(self.exit_code)

    # ------------------------------------------------------------------------------------------ launcher watch
    def _start_watch(self) -> None:
        parent = os.getppid()
        if parent <= 1:
            return
        grandparent = None
        if b"deepspeed.launcher.launch" in _cmdline(parent):     # the `deepspeed` runner started that launcher
            gp = _ppid_of(parent)
            grandparent = gp if gp and gp > 1 else None
        self._watching = True

        def watch():
            while self._watching and not self.requested:
                time.sleep(WATCH_PERIOD_S)
                if os.getppid() != parent or (grandparent and _ppid_of(parent) != grandparent):
                    if self._watching and not self.requested:
                        self.request("launcher exit")
                    return
        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
