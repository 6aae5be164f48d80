"""Errors a user can fix. The CLI prints these as one line and exits with code 2;
anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input, a missing file, an impossible option: the message names the fix."""


class DataError(UserError, ValueError):
    """Input data exists but is unusable (empty, corrupt, wrong shape)."""
