"""Stop requests: Ctrl-C, SIGTERM and SIGUSR1 end a run after the current optimizer step, with a checkpoint.

SLURM sends SIGTERM on preemption, on ``scancel`` and at the time limit (``--signal=USR1@120`` sends
SIGUSR1 earlier); ``torchrun`` forwards SIGTERM and SIGINT to every worker (SIGUSR1 only with
``--signals-to-handle``). Each of them becomes a request that the training loop honours at the end
of the step: every rank shares its request in the step's all-reduce (:meth:`StopRequest.as_tensor`,
:meth:`StopRequest.adopt`), so all ranks stop after the same step, write the checkpoint and exit
with :data:`EXIT_CODES` (128 + the signal number, what a shell reports for that signal). A second
Ctrl-C aborts at once.

Inside a submitit job (the Hydra submitit launcher) submitit's own preemption signal
(``SUBMITIT_PREEMPT_SIGNAL``, USR2 unless set) is handled the same way, and after the checkpoint
:meth:`StopRequest.finish` hands the signal to the handler submitit installed before ours: submitit
then calls the launcher's ``checkpoint()``, requeues the job and exits; the requeued job resumes
(:func:`launchers.runs.run_guard.open_run`).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, NoReturn

import torch

log = logging.getLogger("launchers.train")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop a run after the current step (plus submitit's preemption signal in a submitit job)."""

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGUSR2: 140}
"""Exit code after a stop: 128 + the signal number, as a shell reports a process ended by that signal."""


def host_preemption_signal() -> signal.Signals | None:
    """The preemption signal of the submitit job this process runs in (None outside submitit)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    return getattr(signal.Signals, f"SIG{name}", None)


class StopRequest:
    """Turns the stop signals into a request honoured after the current optimizer step.

    Install it for the duration of the loop; :meth:`restore` puts the previous handlers back.
    """

    def __init__(self) -> None:
        host = host_preemption_signal()
        self.signals: tuple[signal.Signals, ...] = (*STOP_SIGNALS, *([host] if host and host not in STOP_SIGNALS else []))
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived here or on another rank (:meth:`adopt`)."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The code the process exits with after the stop."""
        return EXIT_CODES.get(self.signum, 128 + int(self.signum or 0))

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT:  # a second Ctrl-C stops at once
                self.restore()
                raise KeyboardInterrupt
            log.warning("%s: already stopping after this step", name)
            return
        self.signum = signum
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        log.warning("%s: finishing this step, writing a checkpoint, then stopping%s", name, again)

    def as_tensor(self) -> torch.Tensor:
        """This rank's request, one float64 slot per stop signal, for the step's all-reduce (sum)."""
        flags = torch.zeros(len(self.signals), dtype=torch.float64)
        if self.signum is not None:
            flags[self.signals.index(self.signum)] = 1.0
        return flags

    def adopt(self, summed: torch.Tensor) -> bool:
        """Take over a request from the all-reduced :meth:`as_tensor` of every rank; True when stopping.

        A rank that got no signal itself stops too, with the first requested signal's exit code. The
        decision comes from ``summed`` alone, so that every rank makes the same one: a signal that lands
        here after this step's :meth:`as_tensor` is not in the sum yet, and is shared at the next step.
        """
        hit = [sig for sig, count in zip(self.signals, summed.tolist(), strict=True) if count > 0]
        if not hit:
            return False
        if self.signum is None:
            self.signum = hit[0]
        return True

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def finish(self) -> NoReturn:
        """After the final checkpoint: pass the signal on to the handler installed before ours, then exit.

        Outside submitit that handler is the default one and nothing is called; inside a submitit job
        it is submitit's (requeue on its preemption signal, a log line on SIGTERM).
        """
        signum = self.signum
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous) and previous is not signal.default_int_handler:
            log.info("passing %s on to the handler installed before the run (%s)", signal.Signals(signum).name,
                     getattr(previous, "__qualname__", previous))
            previous(signum, None)
        raise SystemExit(self.exit_code)
