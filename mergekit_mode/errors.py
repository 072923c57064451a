"""The one exception type that reaches users.

Everything a user can cause (a bad recipe, a missing folder, a damaged file, a full disk) is raised
as `ModeError` with a one-line message that names the recipe field or file. The CLI turns it into
that line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class ModeError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


class CheckFailed(Exception):
    """A quality gate failed (`check`, a recipe's `checks:`): not a user mistake, so exit code 1."""

    def __init__(self, message: str, reports: tuple = ()) -> None:
        super().__init__(message)
        self.reports = reports  # check.CheckReport of every check run, for the caller to print
