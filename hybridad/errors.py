"""User-facing errors: one clear line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). The CLI prints it as one line, exit code 2."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters.

    For wrapping third-party errors (torch, tifffile, zlib), whose messages run over many lines, in one line.
    """
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


def check_setting(ok: bool, key: str, value: object, rule: str) -> None:
    """`UserError("config key '<key>'=<value>: <rule>")` unless `ok` (config validation, one line)."""
    if not ok:
        raise UserError(f"config key '{key}'={value!r}: {rule}")


def check_choice(key: str, value: object, valid: tuple[str, ...]) -> None:
    """`check_setting` for a value that must be one of `valid`."""
    check_setting(value in valid, key, value, f"use one of {', '.join(repr(v) for v in valid)}")
