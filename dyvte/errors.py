"""One exception family for user-facing problems.

Every error a user can cause (missing files, bad inputs, broken engine folders) raises a
:class:`DyvteError` subclass whose message names the problem and the fix in one line. The CLI
prints it as ``error: <message>`` and exits with status 1, without a traceback.
"""


class DyvteError(Exception):
    """Base class of all user-facing dyvte errors."""


class ModelNotFoundError(DyvteError):
    """A model path or preset could not be resolved to local files."""


class UnsupportedModelError(DyvteError):
    """The checkpoint uses an architecture feature dyvte does not export."""


class InputError(DyvteError):
    """A request (image, prompt, ids, options) is invalid."""


class PromptTooLongError(InputError):
    """A prompt (images included) does not fit the engine folder's input or position limits."""


class MaxTokensError(InputError):
    """A request asks for more new tokens than the engine folder allows (or fewer than 1)."""


class PolicyError(InputError):
    """An exit policy is unknown or cannot run on this engine folder."""


class EngineFolderError(DyvteError):
    """An engine folder is missing, incomplete, corrupted or of another format version."""


class ExportError(DyvteError):
    """An export step failed."""


class ValidationError(ExportError):
    """An exported part disagrees with the PyTorch model beyond its tolerance."""


class BackendUnavailableError(DyvteError):
    """A requested runtime backend is not installed or has no device."""
