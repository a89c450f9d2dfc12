"""The one exception type users see.

Anything a user can fix (a bad option, a missing pack file, a run folder from another config, a full
disk) is raised as `UsageError` with a message that names the bad input and the fix. The CLI prints the
message and exits with status 2; everything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A problem with the user's input or environment, with a message that says how to fix it."""
