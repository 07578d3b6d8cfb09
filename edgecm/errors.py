"""The one exception type that reaches users.

Anything a user can cause (a wrong path, a truncated shard, a file that is not
an image) is raised as ``EdgecmError`` with a message that names the thing at
fault and says how to fix it. The CLI prints that message on one line and
exits with status 2; every other exception is a bug and keeps its traceback.
"""


class EdgecmError(Exception):
    """A problem with the user's input, described in one line with its fix."""
