"""Resident memory of a server over 50 distinct analyses, each viewed layer by layer: the
service's caches stay within the configured budget, and the process's resident memory stays
under that budget (its caches' and DuckDB's) plus what it held with its model loaded (models,
libraries, code)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

BUDGET_MB = 8
STORE_MB = 32  # DuckDB's buffers
ANALYSES = 50
# Allocator slack: freed arrays are not always returned to the system at once.
SLACK = 48 << 20


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = subprocess.run([sys.executable, "-m", "tests.reliability.memory_process",
                          str(tmp_path_factory.mktemp("memory")), str(BUDGET_MB),
                          str(STORE_MB), str(ANALYSES)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=1200, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    growth = found["after"] - found["baseline"]
    print(f"resident growth over {ANALYSES} analyses: {growth / 2**20:.0f} MiB "
          f"({growth / ANALYSES / 2**20:.2f} MiB per analysis; {found['viewed'] / 2**20:.0f} "
          f"MiB viewed; budget {BUDGET_MB} + {STORE_MB} MiB; caches hold "
          f"{found['cached'] / 2**20:.1f} MiB)")
    return found


def test_the_service_caches_stay_within_the_budget(figures):
    assert figures["cached"] <= BUDGET_MB << 20
    # Without a bound the caches would hold every layer and rollout viewed: twice the bound.
    assert figures["viewed"] > 2 * ((BUDGET_MB << 20) + SLACK)


def test_resident_memory_stays_within_the_budget_plus_the_models(figures):
    assert figures["after"] - figures["baseline"] < figures["budget"] + SLACK
