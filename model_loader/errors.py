"""Named errors at the project's boundaries; the UI and `app.py` turn them into messages in one place."""

from __future__ import annotations


class AppError(Exception):
    """Base for errors a user may see: a message plus what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ConfigError(AppError):
    """A setting is out of range or contradicts another."""


class WeightsMissing(AppError):
    """The model could not be found locally nor fetched from any hub."""


class NotDownloaded(WeightsMissing):
    """--check without --download: the model is not on this machine yet (not a failure, it comes at start-up)."""


class WeightsInvalid(AppError):
    """Files are present but not loadable (truncated shard, wrong layout, bad quantization_config...)."""

    def __init__(self, problems: list[str], path: str) -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__(
            f"The model at {path} is not usable: " + "; ".join(problems),
            "Fix or delete the files named above and start again; a hub download is fetched again.",
        )


class DownloadFailed(AppError):
    """Every hub we tried failed."""


class QuantizationFailed(AppError):
    """lmdeploy's auto_awq did not produce a checkpoint."""


class CalibrationDataUnavailable(QuantizationFailed):
    """The calibration text (wikitext2 from the hub, or --calib-file) could not be loaded."""


class QuantizationOutOfMemory(QuantizationFailed):
    """Quantizing ran out of GPU memory or RAM."""


class PublishFailed(AppError):
    """--push-to-hub could not upload the quantized model."""


class DoesNotFit(AppError):
    """The memory planner predicts that the engines do not fit on the GPU."""


class EngineFailed(AppError):
    """An engine could not be built or broke while serving."""


class DriverTooOld(EngineFailed):
    """The NVIDIA driver is older than the CUDA that lmdeploy's TurboMind was built for."""


class NoGPU(AppError):
    """TurboMind needs an NVIDIA GPU and none is visible."""


class BadInput(AppError):
    """A message or upload the app refuses, with the reason."""
