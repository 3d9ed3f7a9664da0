"""Run one benchmark step in a child Python process and read back its own wall time and peak memory.

The child's peak is its VmHWM (its own peak RSS); ``ru_maxrss`` would include the parent's, which Linux keeps
across exec.
"""

from __future__ import annotations

import json
import subprocess
import sys

_PRELUDE = r"""
import json, sys, time
t0 = time.perf_counter()


def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


"""

_EPILOGUE = r"""
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb()}))
"""


def run_measured(body: str, *args: str) -> dict:
    """Run ``body`` (Python source reading ``sys.argv[1:]``) in a child; ``{"seconds": ..., "peak_mb": ...}``
    measured inside it, from before its imports to its end."""
    script = _PRELUDE + body + _EPILOGUE
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
