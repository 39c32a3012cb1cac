"""User-facing errors: one clear line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). The CLI prints it as one line, exit code 2."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters.

    For wrapping third-party errors (torch, tifffile, zlib), whose messages run over many lines, in one line.
    """
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
