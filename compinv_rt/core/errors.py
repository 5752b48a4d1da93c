"""The error hierarchy. The CLI turns any `CompinvError` into one clear line and exit code 1;
anything else is a bug and keeps its traceback."""


class CompinvError(Exception):
    """Base of every error the user can fix (bad input, missing files, unavailable backends)."""


class ConfigError(CompinvError):
    """Invalid option values or combinations."""


class ModelError(CompinvError):
    """A base model folder that is missing, incomplete, corrupt or not loadable offline."""


class ArtifactError(CompinvError):
    """A trained-concept artifact (embeddings, layout model) that is missing or corrupt."""


class ExportError(CompinvError):
    """Building an ONNX model or engine failed."""


class BackendUnavailable(CompinvError):
    """The requested backend (TensorRT, CUDA, an ONNX Runtime provider) is not available here."""


class EngineMismatch(CompinvError):
    """An engine built for another model, shape profile, GPU or tool version."""


class OutputError(CompinvError):
    """The output location cannot be written."""


class NonFiniteError(CompinvError):
    """NaN or Inf where numbers must be finite (latents, images, losses, embeddings)."""


class NonFiniteOutput(NonFiniteError):
    """Some images of a batch came out non-finite. `images` holds the good ones (None where bad),
    so batch callers can keep the rest and fail only the items at `bad`."""

    def __init__(self, bad: list[int], images: list):
        self.bad, self.images = bad, images
        super().__init__(f"non-finite values (NaN/Inf) in image(s) {bad} of the batch")
