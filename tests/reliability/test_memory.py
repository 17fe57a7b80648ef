"""Resident memory of a server after 50 distinct analyses stays under the service's configured
memory budget plus what the process held with its model loaded (models, libraries, code)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

BUDGET_MB = 8
ANALYSES = 50
# Allocator slack: freed arrays are not always returned to the system at once.
SLACK = 48 << 20


def test_memory_after_fifty_analyses_stays_within_the_budget(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.reliability.memory_process",
                          str(tmp_path), str(BUDGET_MB), str(ANALYSES)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=900, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["cached"] <= figures["budget"]
    # Without a bound the caches would hold every layer and rollout viewed: twice the bound.
    assert figures["viewed"] > 2 * (figures["budget"] + SLACK)
    growth = figures["after"] - figures["baseline"]
    print(f"resident growth over {ANALYSES} analyses: {growth / 2**20:.0f} MiB "
          f"({growth / ANALYSES / 2**20:.2f} MiB per analysis; {figures['viewed'] / 2**20:.0f} "
          f"MiB viewed; budget {BUDGET_MB} MiB)")
    assert growth < figures["budget"] + SLACK
