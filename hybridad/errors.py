"""User-facing errors: one clear line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). The CLI prints it as one line, exit code 2."""
