"""A full, unwritable or read-only disk ends every command with one line naming the path."""

from __future__ import annotations

import argparse
import errno

import pytest

from hybridad import cli


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                             (errno.EROFS, "read-only file system")])
def test_storage_errors_print_one_line_naming_the_path(code: int, words: str, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(args: argparse.Namespace) -> int:
        try:
            raise OSError(code, "os message", "/runs/can/x/maps/a.tiff")
        except OSError as err:  # as torch.save does: a RuntimeError raised while handling the OSError
            raise RuntimeError("PytorchStreamWriter failed writing file") from err

    monkeypatch.setattr(cli, "_cmd_report", failing)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "runs/can/x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hybridad: error: /runs/can/x/maps/a.tiff: ") and words in err


def test_other_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(args: argparse.Namespace) -> int:
        raise OSError(errno.EIO, "I/O error", "/x")

    monkeypatch.setattr(cli, "_cmd_report", failing)
    with pytest.raises(OSError, match="I/O error"):
        cli.main(["report", "runs/can/x"])
