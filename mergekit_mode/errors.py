"""The one exception type that reaches users.

Everything a user can cause (a bad recipe, a missing folder, a damaged file, a full disk) is raised
as `ModeError` with a one-line message that names the recipe field or file. The CLI turns it into
that line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class ModeError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""
