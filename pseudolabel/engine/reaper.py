"""Stops what is left of a local Ray node once the driver that started it is gone.

Ray ties the processes a driver starts (GCS, raylet, monitors) to the driver's life, but not the
agents the raylet starts (dashboard agent, runtime-env agent): after a ``kill -9`` of the driver they
linger for about a minute, or longer on a loaded machine. The driver runs this module as a small
process of its own::

    python -m pseudolabel.engine.reaper NODE_ID [--raylet PID] [--session DIR]

and keeps the write end of its stdin open. When the driver exits, however it exits, the kernel closes
that pipe; the reaper then reads end-of-file, waits for the driver to be gone, kills the node's raylet
(so nothing restarts an agent or starts a worker meanwhile) and stops every process of the node
(SIGTERM, then SIGKILL after a grace period), in rounds until two looks a second apart find none.

A process is the node's when its environment carries ``RAY_NODE_ID=NODE_ID`` (the agents) or
``RAY_RAYLET_PID=PID`` (the workers), or when it holds a file under ``DIR/logs`` open for writing
(every agent and worker writes its logs there). The second test is needed: a Ray process that sets its
title (``ray::DashboardAgent``) overwrites the start of the memory ``/proc/PID/environ`` shows, and
depending on the lengths of its arguments the node id can be among what is lost. ``DIR`` is the
session directory of a local Ray this driver started alone, so no other node writes there; processes
of other Ray nodes on the machine carry other ids and other sessions and are never touched, nor is a
reader of the logs (``tail -f``). Linux only (it reads ``/proc``).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

#: seconds between SIGTERM and SIGKILL
GRACE_S = 2.0
#: at most this long in rounds of stopping what is left (processes started during a round included)
ROUNDS_S = 60.0
#: seconds between the two looks that must both find nothing left
QUIET_S = 1.0


def node_processes(node_id: str, raylet_pid: str | None = None, session_dir: str | None = None) -> list[int]:
    """Pids of the live processes (this one excepted) started for the Ray node ``node_id`` (hex): its
    agents (``RAY_NODE_ID``), given the node's raylet pid its workers (``RAY_RAYLET_PID``), and given
    its session directory every process writing to a file under ``session_dir/logs``."""
    needles = {f"RAY_NODE_ID={node_id}".encode()}
    if raylet_pid:
        needles.add(f"RAY_RAYLET_PID={raylet_pid}".encode())
    logs = os.path.join(os.path.realpath(session_dir), "logs") + os.sep if session_dir else None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needles.intersection(environ) or (logs and _writes_under(int(entry), logs)):
            pids.append(int(entry))
    return pids


def _writes_under(pid: int, directory: str) -> bool:
    """True when process ``pid`` holds a file under ``directory`` (ending in a separator) open for
    writing (the access mode in ``/proc/PID/fdinfo/FD``: ``O_WRONLY`` or ``O_RDWR``)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(directory):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):  # closed meanwhile
            continue
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            return True
    return False


def stop(pids: list[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM each pid, then SIGKILL those still alive after ``grace_s`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        pids = alive
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited already
    except OSError:
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pseudolabel.engine.reaper")
    parser.add_argument("node_id", help="the Ray node's id (hex)")
    parser.add_argument("--raylet", default=None, help="the node's raylet pid")
    parser.add_argument("--session", default=None, help="the node's session directory (a local Ray's own)")
    args = parser.parse_args(argv)
    node_id, raylet_pid = args.node_id, args.raylet
    driver = os.getppid()
    # 1. Outlive the driver's terminal: Ctrl-C and hang-ups go to the driver, not here.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # 2. Wait for the driver to go: its end of the pipe closes when it exits, however it exits, but
    #    may close a little earlier (the interpreter's clean-up at exit), so wait for the driver itself
    #    to be gone too (this process then has another parent): it writes the session's logs as well.
    while sys.stdin.buffer.read(4096):
        pass
    while os.getppid() == driver:
        time.sleep(0.1)
    # 3. The node's raylet first (it dies with the driver, but slowly): while it lives it restarts the
    #    agents and starts workers, so a round could find none and a new agent appear just after.
    if raylet_pid and _is_raylet(int(raylet_pid)):
        stop([int(raylet_pid)], grace_s=0.0)
    # 4. Stop what is left of its node (nothing, after a clean ray.shutdown), in rounds until two
    #    looks a second apart find nothing.
    deadline = time.monotonic() + ROUNDS_S
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        pids = node_processes(node_id, raylet_pid, args.session)
        if pids:
            quiet = 0
            stop(pids)
        else:
            quiet += 1
            time.sleep(QUIET_S)
    return 0


def _is_raylet(pid: int) -> bool:
    """True when ``pid`` is a live raylet (not a process that took over the number of one that exited)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"raylet" and _alive(pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
