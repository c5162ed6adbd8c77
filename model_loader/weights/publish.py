"""Publish the 4-bit model once, so every later deployment downloads 1.5 GB instead of quantizing 3.6 GB."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from model_loader.errors import PublishFailed

log = logging.getLogger(__name__)

MODEL_CARD = """---
library_name: lmdeploy
tags: [internlm2, awq, 4-bit, turbomind]
---
# {name} (4-bit AWQ)

{source} quantized with lmdeploy 0.11.1 `auto_awq` (4-bit weights, group size 128, calibrated on {calib}),
for LMDeploy's TurboMind engine. Published by `python app.py --quantize-only --push-to-hub {repo}`; a deployment
uses it with `APP_TEXT_AWQ_REPO={repo}`.
"""


def push_to_hub(folder: Path, repo: str, env: Mapping[str, str], source: str = "", calib: str = "wikitext2") -> str:
    """Create `repo` (if needed) and upload `folder` to it with huggingface_hub; returns the repo's URL."""
    from huggingface_hub import HfApi  # noqa: PLC0415
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415

    token = env.get("HF_TOKEN", "")
    if not token:
        raise PublishFailed(
            "Uploading needs a Hugging Face token, and HF_TOKEN is not set.",
            "Create a token with write access at https://huggingface.co/settings/tokens and run again with HF_TOKEN=...",
        )
    api = HfApi(endpoint=env.get("HF_ENDPOINT") or None, token=token)
    card = folder / "README.md"
    if not card.exists():
        card.write_text(
            MODEL_CARD.format(name=repo.rsplit("/", 1)[-1], source=source or "InternLM2-Chat", calib=calib, repo=repo)
        )
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type="model",
            commit_message="4-bit AWQ (lmdeploy auto_awq, w4 g128)",
            ignore_patterns=[".*", "*.partial*"],
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise PublishFailed(
            f"The hub refused the upload to {repo} (HTTP {status}).",
            "Check that HF_TOKEN has write access to that repo or its organisation.",
        ) from e
    except OSError as e:
        raise PublishFailed(f"Could not upload to {repo}: {e}", "Check the network or HF_ENDPOINT.") from e
    url = f"{api.endpoint.rstrip('/')}/{repo}"
    log.info("uploaded %s to %s", folder, url)
    return url
