"""Errors meant for the user: the CLI prints them as one line each and exits 2, with no traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file). The message names the thing and the fix."""


class NoTextError(UserError):
    """A tokenizer was to be learned from texts that held none; callers that know the inputs say which."""


class StageFailed(Exception):
    """A stage ran but could not finish (workers kept failing). Printed as one line, exit 1; checkpoints stay."""
