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
import socket
import time
from pathlib import Path


def _alive(owner: dict, stale_after: float) -> bool:
    if owner.get("host") != socket.gethostname():
        return time.time() - owner.get("time", 0) < stale_after
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    def __init__(self, folder: str | Path, stale_after: float = 24 * 3600):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after

    @contextlib.contextmanager
    def _locked(self):
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
        return owner if _alive(owner, self.stale_after) else None

    def claim(self, key: str, finished) -> str:
        """'claimed', 'finished' or 'busy'; `finished()` is checked under the lock."""
        with self._locked():
            if finished():
                return "finished"
            if self.owner(key) is not None:
                return "busy"
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
            (self.folder / f"{key}.json").write_text(json.dumps(owner))
            return "claimed"

    def release(self, key: str) -> None:
        (self.folder / f"{key}.json").unlink(missing_ok=True)
