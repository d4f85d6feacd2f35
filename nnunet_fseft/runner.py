"""The one way we run nnU-Net's commands, and the one way we keep their output off the terminal.

`run` starts a command installed beside this interpreter (nnUNetv2_*, nnunet-fseft) with the
environment it needs, copies its output to a log file, and on failure raises `CommandFailed`
naming the command and showing its last lines. `quiet` sends what in-process nnU-Net code
prints (and the worker processes it starts) to a log file, or nowhere.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional, Sequence

# Commands that plan experiments: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA),
# which fails for 0, the value small CPU trainings are run with.
PLANNING = ("nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_experiment", "nnUNetv2_preprocess")
TAIL_LINES = 25


class CommandFailed(RuntimeError):
    """A command we started exited with an error; the message names it and shows its last lines.
    `reason`, one line: the command and its last line of output (where a Python command's error
    is), or how it ended when that says nothing (a timeout, no output)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Finished(subprocess.CompletedProcess):
    """A command that ran: `stdout` holds its output (stdout and stderr together) and
    `peak_host_mib` its peak resident memory."""

    def __init__(self, args, returncode, stdout, peak_host_mib):
        super().__init__(args, returncode, stdout)
        self.peak_host_mib = peak_host_mib


def command_path(name: str) -> str:
    """The command installed beside this interpreter (the environment nnunet-fseft runs in), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.isfile(beside) else (shutil.which(name) or name)


def command_env(command: str, env: Optional[dict] = None) -> dict:
    """This process's environment with `env` on top (a None value unsets that variable), as
    `command` needs it: unbuffered output; planning gets no non-positive nnUNet_n_proc_DA (nnU-Net's
    default instead); every other command gets what the caller asks (training: nnUNet_n_proc_DA=0
    for small CPU runs)."""
    full = {"PYTHONUNBUFFERED": "1", **os.environ, **(env or {})}  # output in order, and complete at a crash
    full = {k: v for k, v in full.items() if v is not None}
    if os.path.basename(command) in PLANNING:
        try:
            if int(full.get("nnUNet_n_proc_DA", "1")) < 1:
                del full["nnUNet_n_proc_DA"]
        except ValueError:
            pass  # nnU-Net's own error names the variable
    return full


def _stop(group: int) -> None:
    """Kills the command's process group: the command and the workers it started (nnU-Net's data
    augmentation and preprocessing processes), which would otherwise keep running and keep its
    output pipe open."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _prctl():
    """libc's prctl on Linux, found once here: not in the forked child, where loading a library is unsafe."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _die_with(parent: int):
    """For the command's process, before it starts (Linux): the kernel kills it when the process that
    started it dies, even by SIGKILL (a benchmark job killed on a cluster, say), so that no training
    goes on unwatched, writing into a run that will be retried. A parent already gone: it stops at
    once. Elsewhere nothing."""
    def before_exec():
        if _PRCTL is not None:
            _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(1)
    return before_exec


def run(args: Sequence, log: Optional[str] = None, env: Optional[dict] = None, check: bool = True,
        on_line: Optional[Callable[[str], None]] = None, timeout: Optional[float] = None,
        cwd: Optional[str] = None) -> Finished:
    """Runs `args` (a command name and its arguments) in the folder `cwd` (default this one),
    appending its output to the file `log` if given and passing each line to `on_line`. Raises
    CommandFailed on a non-zero exit if `check`. Past `timeout` seconds, or when this process stops
    waiting (Ctrl-C, an error in `on_line`), the command and every process it started are killed;
    if this process is killed, the command is killed with it (`_die_with`)."""
    cmd = [command_path(str(args[0]))] + [str(a) for a in args[1:]]
    lines = []
    expired = threading.Event()
    sink = open(log, "a") if log else None
    p = timer = None
    reaped = False
    try:
        if sink:
            sink.write(f"\n$ {' '.join(cmd)}\n")
            sink.flush()
        # a session of its own, so that one signal to its process group reaches its workers too
        # (and Ctrl-C in the terminal reaches only us: the `finally` below then stops it)
        p = subprocess.Popen(cmd, env=command_env(cmd[0], env), cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                             preexec_fn=_die_with(os.getpid()))
        if timeout:
            timer = threading.Timer(timeout, lambda: (expired.set(), _stop(p.pid)))
            timer.start()
        with p.stdout:
            for line in p.stdout:
                lines.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
                if on_line:
                    on_line(line)
        # exited, not reaped yet: its process group is still its own if the timer fires meanwhile
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        if timer:
            timer.cancel()
            timer.join()
        _, status, usage = os.wait4(p.pid, 0)
        reaped = True
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if timer:
            timer.cancel()
        if p is not None and not reaped:  # we stopped waiting (Ctrl-C, an error): it and its workers stop too
            _stop(p.pid)
            p.wait()
        if sink:
            sink.close()
    # ru_maxrss: KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)
    done = Finished(cmd, p.returncode, "".join(lines), peak)
    if check and p.returncode != 0:
        why = f"timed out after {timeout:.0f} s" if expired.is_set() else f"exit {p.returncode}"
        where = f" (all of it in {log})" if log else ""
        tail = "".join(lines[-TAIL_LINES:]).rstrip()
        name, last = os.path.basename(cmd[0]), tail.splitlines()[-1].strip() if tail else ""
        raise CommandFailed(f"{name} failed ({why}): {' '.join(cmd)}\nIts last lines{where}:\n{tail}",
                            f"{name} failed: {last}" if last and not expired.is_set() else f"{name} failed ({why})")
    return done


@contextlib.contextmanager
def quiet(log: Optional[str] = None):
    """Everything printed inside the block, by Python code and by the processes it starts, goes to
    the file `log` (appended) or nowhere; the terminal's streams come back afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    sink = open(log or os.devnull, "a", buffering=1)  # line by line: in order with what child processes write
    streams = sys.stdout, sys.stderr
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no file descriptors 1 and 2 (some embedded interpreters): Python's streams only
        saved = None
    try:
        if saved:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        sys.stdout = sys.stderr = sink
        yield
    finally:
        sink.flush()
        sys.stdout, sys.stderr = streams
        if saved:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
        sink.close()
