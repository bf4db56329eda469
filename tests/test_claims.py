import json
import os
import socket
import subprocess
import sys

from harness.claims import Claims


def test_claim_lifecycle(tmp_path):
    claims = Claims(tmp_path)
    assert claims.claim("k", lambda: False) == "claimed"
    assert claims.owner("k")["pid"] == os.getpid()
    assert claims.claim("k", lambda: True) == "finished"
    claims.release("k")
    assert claims.owner("k") is None


def test_stale_and_foreign_claims(tmp_path):
    claims = Claims(tmp_path, stale_after=60)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # A claim of a process that has exited is stale: taken over.
    (tmp_path / "k.json").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "time": 0}))
    assert claims.claim("k", lambda: False) == "claimed"
    # A live process elsewhere holds "j": busy, and releasing it from here leaves it in place.
    other = {"pid": 1, "host": "another-host", "time": __import__("time").time()}
    (tmp_path / "j.json").write_text(json.dumps(other))
    assert claims.claim("j", lambda: False) == "busy"
    claims.release("j")
    assert json.loads((tmp_path / "j.json").read_text()) == other
    # An old claim from another host is stale after stale_after seconds.
    (tmp_path / "j.json").write_text(json.dumps({**other, "time": 0}))
    assert claims.claim("j", lambda: False) == "claimed"


def test_claim_with_our_pid_from_an_earlier_process_is_stale(tmp_path):
    # A restarted container can give the new runner the pid its dead predecessor had.
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "time": 0}
    (tmp_path / "k.json").write_text(json.dumps(mine))
    assert Claims(tmp_path).claim("k", lambda: False) == "claimed"
