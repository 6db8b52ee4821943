"""The error hierarchy: a user's mistake (exit 2, one line) versus a bug (a traceback)."""


class VlExportError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported config.

    The CLI prints it as one line and exits with `exit_code`; anything else is a bug and keeps its traceback.
    """

    exit_code = 2


class CheckpointError(VlExportError):
    """The checkpoint is missing, of the wrong kind, or does not match its config."""


class UnsupportedConfigError(CheckpointError):
    """The checkpoint is an InternVL variant this tool does not export."""


class BundleError(VlExportError):
    """The bundle is missing, incomplete, or from another schema version."""


class InputError(VlExportError):
    """A request to the runtime is invalid: an image that does not decode, a prompt over the context."""


class BackendUnavailableError(VlExportError):
    """The backend (TensorRT, OpenVINO, a GPU) that was asked for is not there."""


class VerificationFailed(VlExportError):
    """A bundle does not match the reference within the thresholds. Exit 1: the check ran and said no."""

    exit_code = 1
