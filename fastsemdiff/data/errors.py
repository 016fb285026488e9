"""The one exception type of the data package."""
from __future__ import annotations


class DatasetError(ValueError):
    """A data problem the user can fix (missing folder, wrong or damaged file, bad setting).

    The message always says what is wrong and what to do about it, so a run fails at start with an
    actionable line instead of a numpy traceback deep inside a loader.
    """
