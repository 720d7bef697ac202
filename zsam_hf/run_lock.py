"""One writer per output directory: a lock file naming the training process that owns it.

Two jobs writing checkpoints into one directory (the same command started twice, or a launch whose
processes each believe they are alone) overwrite or rename each other's files, and the damage shows
only at the first checkpoint. The process that owns an output directory holds
``_zsam-training.lock`` in it while it trains: its pid, host and process start time. A second job
finds a live owner and is refused at once; a lock left by a job that was killed (its pid gone, or
reused by a later process) is taken over.

Pure file-system code: no torch, no transformers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LOCK_NAME = "_zsam-training.lock"  # a leading "_" keeps it out of Hub uploads, like staging directories


class OutputDirInUseError(RuntimeError):
    """Another live job is writing into this output directory (the message names it)."""


@dataclass
class RunLock:
    path: str
    owner: dict

    def release(self) -> None:
        """Remove the lock file if it is still this process's own."""
        if _read_owner(self.path) == self.owner:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}


def acquire(run_dir: str) -> RunLock:
    """Take the lock of ``run_dir`` (created if needed); raise ``OutputDirInUseError`` if a live job holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    me = this_process()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner is not None and owner != me and _is_alive(owner, me["host"]):
                raise OutputDirInUseError(_in_use_message(run_dir, path, owner)) from None
            if owner is not None and owner != me:
                logger.warning(
                    "Taking over %s: the job that held it (pid %s on %s) is gone.",
                    path,
                    owner["pid"],
                    owner["host"],
                )
            _remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return RunLock(path, me)
    raise OutputDirInUseError(f"Could not take {path}: other processes keep creating it.")


def _in_use_message(run_dir: str, path: str, owner: dict) -> str:
    return (
        f"output_dir={run_dir!r} is in use: another training job (pid {owner['pid']} on host "
        f"{owner['host']!r}) is writing into it, and two writers would overwrite each other's "
        "checkpoints. Wait for it to finish, or give this run another --output_dir. (One job launched "
        "as several processes shares one output_dir only when its processes form one process group: "
        "on CPUs launch with `accelerate launch --multi_gpu --use_cpu --num_processes N` or `torchrun "
        f"--nproc_per_node N`.) If that job is gone, delete {path}."
    )


def _read_owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None  # gone, or half-written by a process killed while it took the lock
    if not isinstance(owner, dict) or not {"pid", "host", "started"} <= owner.keys():
        return None
    return owner


def _is_alive(owner: dict, host: str) -> bool:
    """Whether the owner still runs. On another host we cannot tell, so it counts as alive."""
    if owner["host"] != host:
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The pid exists; it is the owner only if it started when the owner did (pids are reused).
    return owner["started"] is None or _start_time(int(owner["pid"])) == owner["started"]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5), counted after the command name
    except (OSError, IndexError, ValueError):
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
