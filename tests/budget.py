"""How long the reliability suites run: a bounded budget in CI, thousands of inputs with AHEAD_FUZZ=long.

`AHEAD_FUZZ=long python -m pytest -q tests/test_fuzz_lsp.py tests/test_fuzz_engine.py tests/test_doc_sync.py
tests/test_storm.py` is the long run (fuzzing with thousands of examples, the storm for 60 s).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("AHEAD_FUZZ", "").lower() == "long"


def budget(ci: int, long: int) -> int:
    """`ci` in a normal run, `long` in a long one."""
    return long if LONG else ci


def fuzz_settings(ci: int, long: int) -> settings:
    """Hypothesis settings for a target that talks to a subprocess: no deadline (a shared CPU is slow at
    times), no example database (nothing written into the checkout), no complaint about slow data."""
    return settings(max_examples=budget(ci, long), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
