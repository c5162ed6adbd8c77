"""`python -m bench.serve [app flags]`: the app as `python app.py` runs it, but every reply is max_new_tokens long.

Benchmarks compare the app with the raw engine at fixed lengths, so generation ignores EOS here; the product has
no such switch.
"""

from __future__ import annotations

import dataclasses
import os


def main() -> int:
    import app  # noqa: PLC0415
    from model_loader.engines import api_server, turbomind  # noqa: PLC0415

    fixed = turbomind.generation_config
    turbomind.generation_config = lambda s: fixed(dataclasses.replace(s, ignore_eos=True))
    payload = api_server.openai_payload  # the same for the app over an api_server (bench_app --app-backend)
    api_server.openai_payload = lambda s: payload(dataclasses.replace(s, ignore_eos=True))
    if os.environ.get("BENCH_SWITCH_INTERVAL_S"):  # A/B of the interpreter's switch interval while serving
        app.SWITCH_INTERVAL_S = float(os.environ["BENCH_SWITCH_INTERVAL_S"])
    return app.main()


if __name__ == "__main__":
    raise SystemExit(main())
