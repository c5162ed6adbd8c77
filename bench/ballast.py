"""`python -m bench.ballast FREE_GIB`: hold all but FREE_GIB of the GPU in this process until stdin closes.

An A10's memory on a bigger card. The ballast lives in its own process so that the process under test starts with
no CUDA context, as the app does on a real A10 (a ballast in the same process would pay the app's context for it).
Prints one line, `BALLAST {json}`, once the memory is held.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch  # noqa: PLC0415

    free_gib = float(sys.argv[1]) if len(sys.argv) > 1 else 22.5
    free, total = torch.cuda.mem_get_info()
    hold = torch.empty(max(0, int(free - free_gib * 2**30)), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after, _ = torch.cuda.mem_get_info()
    info = {
        "free_gib": free_gib,
        "held_mib": hold.numel() // 2**20,
        "free_after_mib": after // 2**20,
        "total_mib": total // 2**20,
    }
    print("BALLAST", json.dumps(info), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__":
    main()
