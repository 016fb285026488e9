"""Errors a user can act on; the CLIs print their message without a traceback."""


class CheckpointError(RuntimeError):
    """A checkpoint or exported model that is missing, corrupt, or from a different model config."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""
