"""Module paths from before the wings became packages still import, with a DeprecationWarning."""

from __future__ import annotations

import json
import subprocess
import sys

from lorapool._compat import MOVED

# A fresh interpreter: in this one, earlier tests may have imported the old paths already.
SCRIPT = """
import importlib, json, warnings
import lorapool
from lorapool._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = {
        "same": module is importlib.import_module(new),
        "warned": [str(w.message) for w in caught if w.category is DeprecationWarning],
    }
print(json.dumps(out))
"""


def test_every_moved_module_answers_with_its_new_home_and_warns() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(done.stdout)
    assert set(result) == set(MOVED)
    for old, new in MOVED.items():
        assert result[old]["same"], old
        assert any(f"import from {new}" in m for m in result[old]["warned"]), (old, result[old])


def test_names_users_imported_from_the_old_paths_still_resolve() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            "from lorapool.fair import FairScheduler, TierPolicy\n"
            "from lorapool.scheduling import FCFSScheduler, Scheduler, Ticket\n"
            "from lorapool.tiers import Tier, SingleFlight, parse_size\n"
            "from lorapool.registry_store import SqliteRegistryStore, MemoryRegistryStore\n"
            "from lorapool.disk import DiskTier\n"
            "from lorapool.handoff import choose_handoff\n"
            "import lorapool\n"
            "assert FairScheduler is lorapool.FairScheduler\n"
            "print('ok')",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
