"""Train ensemble members in separate processes, several at a time.

On a CPU the members of an ensemble are independent trainings, and one
member gains little from a second core. On a 2-core VM an epoch of the
default model took 1.81 s on two threads and 1.74 s on one. Two members on
one core each took 2.0-2.2 s per epoch, so the ensemble trained about 1.7
times faster. The kernels give bitwise the same numbers for any thread
count, so a member trained in its own process equals the one trained in
the main process.

Each process trains one member with ``dvmrl.cli.train._fit_member`` and
writes its ``model.pt`` and ``last.pt`` as the serial loop does. It sends
its epoch records, log records and standard error to the main process,
which draws the progress bar and writes the lines above it. Processes start with
the ``spawn`` method, because forking a process whose PyTorch thread pools
are running is unsafe.

Ctrl-C reaches every process of the terminal's process group. A member
process saves the state of its last finished epoch, as a serial run does,
and exits with code 130; the main process also forwards the interrupt to
its members, for a SIGINT sent to it alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger("dvmrl")

# Exit codes of a member process.
EXIT_DONE = 0
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1

# Seconds the main process waits for a message before it checks its members.
POLL_SECONDS = 0.2
# Seconds an interrupted member gets to save its state before it is killed.
STOP_SECONDS = 60.0


class MemberFailed(ChildProcessError):
    """A member process that ended without a result or an exception to report.

    Something outside dvmrl killed it, such as the kernel when memory ran
    out or a signal, so the CLI reports an environment failure (exit code 1)
    and not a bug.
    """


class _QueueLogHandler(logging.Handler):
    """Log handler of a member process: sends each record to the main process.

    The main process logs it through its own handlers, which write above
    its progress bar instead of across it.
    """

    def __init__(self, messages, member: int) -> None:
        super().__init__()
        self.messages = messages
        self.member = member

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = (record.levelno, record.name, record.getMessage())
            _put(self.messages, ("log", self.member, payload))
        except Exception:  # noqa: BLE001 - logging must not stop the training
            self.handleError(record)


class _QueueStream(io.TextIOBase):
    """Standard error of a member process: sends each line to the main process.

    The main process writes the lines above its progress bar, so a member's
    message after Ctrl-C does not break the bar's line.
    """

    def __init__(self, messages, member: int) -> None:
        super().__init__()
        self.messages = messages
        self.member = member
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            _put(self.messages, ("text", self.member, line))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            _put(self.messages, ("text", self.member, self.pending))
            self.pending = ""


def _follow_parent(parent: int) -> None:
    """Make this member process stop when the main process ``parent`` ends.

    On Linux the kernel sends SIGINT when the parent dies, so the member
    saves its state and exits. Elsewhere the member notices at its next
    epoch, when its epoch callback compares the parent's process id.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1  # from <sys/prctl.h>
            libc.prctl(pr_set_pdeathsig, int(signal.SIGINT))
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        raise KeyboardInterrupt  # the parent ended before the line above


class _Interrupt:
    """Ctrl-C and SIGTERM in a member process: one KeyboardInterrupt, never mid-put.

    The terminal and the main process may both send the signal. Later
    signals are ignored, because they must not interrupt the saving of the
    state that the first one started. A KeyboardInterrupt raised inside
    ``multiprocessing.Queue.put`` can break the queue: in 6 of 40 trials, a
    child that put in a loop never delivered its next message (for a
    member, the "interrupted after" line). So a signal that arrives while a
    message is being put is raised once the put has returned.
    """

    def __init__(self) -> None:
        self.received = False
        self.deferred = False
        self.depth = 0

    def handler(self, signum, frame) -> None:  # noqa: ARG002 - signal's signature
        if self.received:
            return
        self.received = True
        if self.depth:
            self.deferred = True
            return
        raise KeyboardInterrupt

    def put(self, messages, item) -> None:
        """Put ``item`` on ``messages``; an interrupt meanwhile is raised after."""
        if threading.current_thread() is not threading.main_thread():
            # Signal handlers run in the main thread only, so only its puts
            # defer them.
            messages.put(item)
            return
        self.depth += 1
        try:
            messages.put(item)
        finally:
            self.depth -= 1
        if self.deferred and not self.depth:
            self.deferred = False
            raise KeyboardInterrupt


# The handler of this process, installed by _interrupt_once. Until then
# (and in the main process, which puts nothing) puts are not shielded.
_interrupt = _Interrupt()


def _interrupt_once() -> _Interrupt:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt once; return the handler.

    A batch system's time limit sends SIGTERM to every process of the job, so
    a member saves its state for it as for Ctrl-C.
    """
    global _interrupt
    _interrupt = _Interrupt()
    signal.signal(signal.SIGINT, _interrupt.handler)
    signal.signal(signal.SIGTERM, _interrupt.handler)
    return _interrupt


def _put(messages, item) -> None:
    """Put a message for the main process, outside the reach of Ctrl-C."""
    _interrupt.put(messages, item)


def _portable_error(err: BaseException) -> BaseException:
    """Return ``err`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - any failure means: send the text instead
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def _member_process(job: dict[str, Any], messages) -> None:
    """Train one member and exit with its outcome (the target of a member process)."""
    _interrupt_once()
    member = job["member"]
    sys.stderr = _QueueStream(messages, member)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_QueueLogHandler(messages, member))
    root.setLevel(job["log_level"])
    code = EXIT_FAILED
    try:
        # The main process started this one with SIGINT and SIGTERM blocked;
        # one that arrived meanwhile is delivered here, to the handler above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        _follow_parent(job["parent"])
        from dvmrl import set_num_threads
        from dvmrl._files import check_same_folder
        from dvmrl.cli.train import MODEL_FILE, STATE_FILE, _fit_member

        set_num_threads(job["threads"])
        folder = Path(job["folder"])

        def guard() -> None:
            # The main process holds the output folder's lock; this process
            # checks that the folder it locked is still in place. Jobs built
            # without an output folder (the Python API) check nothing.
            if job.get("out") is not None:
                check_same_folder(job["out"], job["out_identity"])

        def report(record: dict) -> None:
            if os.getppid() != job["parent"]:
                # The main process ended: stop after this saved epoch.
                raise KeyboardInterrupt
            _put(messages, ("epoch", member, record))

        trainer = _fit_member(
            folder,
            job["run_config"],
            job["data"],
            job["metadata"],
            job["device"],
            job["label"],
            show_bar=False,
            report=report,
            guard=guard,
        )
        if trainer is None:
            _put(messages, ("interrupted", member, None))
            code = EXIT_INTERRUPTED
        else:
            guard()
            trainer.save(folder / MODEL_FILE, metadata=job["metadata"])
            trainer.save(folder / STATE_FILE, metadata=job["metadata"])
            summary = {
                "epochs_done": int(trainer.epochs_done),
                "best_epoch": trainer.best_epoch,
                "best_score": trainer.best_score,
                "monitor": trainer.train_config.monitor,
            }
            _put(messages, ("done", member, summary))
            code = EXIT_DONE
    except KeyboardInterrupt:
        # Ctrl-C outside the epochs, such as while PyTorch loads or a file is
        # written. The state file contains the last finished epoch.
        _put(messages, ("interrupted", member, None))
        code = EXIT_INTERRUPTED
    except BaseException as err:  # noqa: BLE001 - reported to the main process
        code = EXIT_FAILED
        # A Ctrl-C now would only hide the error, so it is ignored here.
        with contextlib.suppress(KeyboardInterrupt):
            if job["log_level"] <= logging.DEBUG:
                traceback.print_exc()
            _put(messages, ("error", member, _portable_error(err)))
    finally:
        # Flush the messages before the exit code becomes visible. An
        # interrupt from now on would only break the exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stderr.flush()
        messages.close()
        messages.join_thread()
    sys.exit(code)


def _describe_exit(code: int | None) -> str:
    """Describe a process exit code: "exit code 1" or "signal SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _record_signals(signals: list[int]) -> dict[int, Any] | None:
    """Make SIGINT and SIGTERM append to ``signals``; return the old handlers.

    Returns None, and changes nothing, off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def record(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        signals.append(signum)

    signums = (signal.SIGINT, signal.SIGTERM)
    return {signum: signal.signal(signum, record) for signum in signums}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def train_members(
    jobs: list[dict[str, Any]],
    processes: int,
    progress,
) -> list[int]:
    """Train the members of ``jobs`` in up to ``processes`` processes at once.

    A KeyboardInterrupt stops the members: Ctrl-C, or SIGTERM, which
    dvmrl.cli.main turns into one, so a batch system's time limit leaves
    every state saved and no member process running.

    Args:
        jobs: one dict per member with ``member``, ``folder``, ``run_config``,
            ``data``, ``metadata``, ``device``, ``label`` and ``threads`` (the
            thread count of its process), as ``_fit_member`` takes them.
        processes: the maximum number of member processes running at once, at
            least 1.
        progress: an object with ``start(member)``, ``epoch(member,
            record)``, ``finish(member, summary)`` and ``close()``, called in
            this process.

    Returns:
        list[int]: the members, in the order they finished.

    Raises:
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once every member has
            stopped; each state file contains its member's last finished epoch.
        Exception: the exception that a member's training raised (such as
            TrainingDivergedError), with the member's index in its ``member``
            attribute, after the other members stopped and saved their states.
        MemberFailed: when a member process ended without a message (killed
            by the system, for instance).
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    pending = list(jobs)
    folders = {job["member"]: job["folder"] for job in jobs}
    running: dict[int, Any] = {}
    reported: set[int] = set()
    finished: list[int] = []
    failure: BaseException | None = None
    interrupted = False
    signals: list[int] = []
    log_level = logging.getLogger().getEffectiveLevel()

    def handle(kind: str, member: int, payload) -> None:
        nonlocal failure, interrupted
        if kind == "log":
            level, name, text = payload
            logging.getLogger(name).log(level, "%s", text)
            return
        if kind == "text":
            from tqdm import tqdm

            tqdm.write(payload, file=sys.stderr)
            return
        if kind == "epoch":
            progress.epoch(member, payload)
            return
        reported.add(member)
        if kind == "done":
            finished.append(member)
            progress.finish(member, payload)
        elif kind == "interrupted":
            interrupted = True
        elif kind == "error" and failure is None:
            failure = payload
            with contextlib.suppress(AttributeError, TypeError):
                failure.member = member  # the caller names the member

    def drain(timeout: float | None) -> None:
        try:
            item = messages.get(timeout=timeout) if timeout else messages.get_nowait()
            while True:
                handle(*item)
                item = messages.get_nowait()
        except queue_module.Empty:
            return

    def reap() -> None:
        nonlocal failure
        for member, process in list(running.items()):
            if process.exitcode is None:
                continue
            process.join()
            drain(None)
            del running[member]
            if member not in reported and failure is None and not signals:
                # After a recorded signal, a member that died of it is part
                # of the interrupt, not a failure.
                failure = MemberFailed(
                    f"the process of member {member} ended with "
                    f"{_describe_exit(process.exitcode)} before it finished (out "
                    f"of memory, or killed from outside); its state is in "
                    f"{folders[member]}"
                )

    def stop_all() -> None:
        progress.close()
        # The interrupt is sent again every POLL_SECONDS: a process that is
        # still starting (importing PyTorch) has no handler for it yet. A
        # member's handler acts on the first one only.
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            alive = [p for p in running.values() if p.exitcode is None]
            if not alive:
                break
            for process in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGINT)
            drain(POLL_SECONDS)
        for process in running.values():
            if process.exitcode is None:
                process.kill()
            process.join()
        drain(None)
        running.clear()

    def start(job: dict[str, Any]) -> None:
        member = job["member"]
        process = context.Process(
            target=_member_process,
            args=({**job, "log_level": log_level, "parent": os.getpid()}, messages),
            name=f"dvmrl-member-{member}",
        )
        # The child inherits this blocked mask across exec. A Ctrl-C or
        # SIGTERM that arrives while it starts stays pending there until its
        # own handler is installed, so it neither prints a traceback nor dies
        # unsaved during its imports. start() can take seconds, because it
        # waits until the child has read its job.
        stopping = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
        try:
            process.start()
            running[member] = process
            progress.start(member)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    # Ctrl-C and SIGTERM are recorded and acted on between messages,
    # because a KeyboardInterrupt raised inside Queue.get can stop it halfway
    # through a message. Every later get then failed with EOFError (6 of 40
    # trials against a child that put in a loop), so the members' last lines
    # were lost and exit 130 became a failure. Called off the main thread,
    # where handlers cannot be set, this leaves the process's handlers as
    # they are.
    previous = _record_signals(signals)
    try:
        while running or (pending and failure is None and not interrupted):
            while (
                pending
                and len(running) < processes
                and failure is None
                and not interrupted
                and not signals
            ):
                start(pending.pop(0))
            if signals:
                raise KeyboardInterrupt
            drain(POLL_SECONDS)
            reap()
            if signals:
                raise KeyboardInterrupt
            if (failure is not None or interrupted) and running:
                stop_all()
    except KeyboardInterrupt:
        # Signals during the stop are recorded, and so ignored: they must
        # not interrupt the members' saving of their states.
        interrupted = True
        stop_all()
    finally:
        messages.close()
        _restore_signals(previous)
    if signals and failure is None:
        # A signal recorded after the loop's last check still stops the run.
        interrupted = True
    if failure is not None:
        raise failure
    if interrupted:
        raise KeyboardInterrupt
    return finished
