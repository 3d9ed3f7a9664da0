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


def run_measured(body: str, *args: str, code: str | None = None) -> dict:
    """Run ``body`` (Python source reading ``sys.argv[1:]``) in a child; ``{"seconds": ..., "peak_mb": ...}``
    measured inside it, from before its imports to its end. ``code``: a checkout of lightning-merge whose package
    the child imports instead of the installed one (to measure another version side by side)."""
    import os

    script = _PRELUDE + body + _EPILOGUE
    env = None
    if code is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True, env=env,
                         cwd=code)
    return json.loads(out.stdout.strip().splitlines()[-1])
