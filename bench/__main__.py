"""The whole benchmark in one run on a CUDA machine: engines, planner and A10 ballast, then the app against the
raw engine like for like (bench_app's defaults: 5 runs). Results land in $OUT (default bench/out): engines.json,
app.json, bench.md, bench.png. The A10 capacity bench runs on its own: `python -m bench.a10_capacity`.

    python -m bench [--skip-ratios] [--skip-a10]
"""

from __future__ import annotations

import subprocess
import sys


def main(argv: list[str]) -> int:
    steps = [[sys.executable, "-m", "bench.gpu_engines", *argv], [sys.executable, "-m", "bench.bench_app"]]
    for cmd in steps:  # separate processes: each step needs the whole GPU to itself
        rc = subprocess.run(cmd, check=False).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
