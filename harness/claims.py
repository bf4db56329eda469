"""Claims: a run is claimed before it starts, so that two processes on one suite run it once.

A claim is a small JSON file per run_key under results/claims/<suite>/, written while holding an
exclusive lock on that folder, after checking that the run is neither FINISHED nor claimed by a
live process. A claim whose process is gone (killed, crashed) is stale: the next process takes it
over and reruns the run. Processes on other hosts are considered alive for `stale_after` seconds
(the lock needs a filesystem with working flock: local disks; on shared filesystems check yours).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

# Claims this process holds. A claim with our pid that is not in here was written by an earlier
# process that had the same pid (a restarted container): stale.
_MINE: set[Path] = set()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_suffix() -> str:
    """The end of a scratch folder's name: its owner, so that the next invocation can tell it is dead."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}"


def clean_scratch(results_dir: str | Path) -> list[Path]:
    """Remove the scratch folders under results/tmp and results/data (a half-written synthetic
    dataset, an evaluation's scratch folder) whose owner, a process of this host, is dead."""
    results_dir, removed = Path(results_dir), []
    for path in [*(results_dir / "tmp").glob("*.tmp-*@*"), *(results_dir / "data").glob("*.tmp-*@*")]:
        owner = re.search(r"\.tmp-(\d+)@(.+)$", path.name)
        if owner and owner[2] == socket.gethostname() and int(owner[1]) != os.getpid() and not pid_alive(int(owner[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(owner: dict, stale_after: float, path: Path) -> bool:
    if owner.get("host") != socket.gethostname():
        return time.time() - owner.get("time", 0) < stale_after
    if owner.get("pid") == os.getpid():
        return path in _MINE
    return pid_alive(owner["pid"])


class Claims:
    def __init__(self, folder: str | Path, stale_after: float = 24 * 3600, create: bool = True):
        self.folder = Path(folder)
        if create:  # a dry run only reads
            self.folder.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after

    @contextlib.contextmanager
    def locked(self):
        with open(self.folder / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def owner(self, key: str) -> dict | None:
        """The live owner of a claim, or None when unclaimed or stale."""
        path = self.folder / f"{key}.json"
        try:
            owner = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return owner if _alive(owner, self.stale_after, path.resolve()) else None

    def claim(self, key: str, finished) -> str:
        """'claimed', 'finished' or 'busy'; `finished()` is checked under the lock."""
        with self.locked():
            if finished():
                return "finished"
            if self.owner(key) is not None:
                return "busy"
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
            path = self.folder / f"{key}.json"
            path.write_text(json.dumps(owner))
            _MINE.add(path.resolve())
            return "claimed"

    def release(self, key: str) -> None:
        """Remove the claim if it is still ours (another process may have taken over a stale one)."""
        path = self.folder / f"{key}.json"
        with self.locked():
            try:
                owner = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                path.unlink()
                _MINE.discard(path.resolve())
