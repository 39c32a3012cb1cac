"""Command-line help: every option of every command explains itself; `train --help` names the keys."""

from __future__ import annotations

import argparse

import pytest

from hybridad.cli import build_parser, main


Command = tuple[str, argparse.ArgumentParser]


def _commands(parser: argparse.ArgumentParser, name: str = "hybridad") -> list[Command]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _commands(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_has_help() -> None:
    undocumented = [f"{name}: {action.dest}" for name, parser in _commands(build_parser())
                    for action in parser._actions
                    if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                    and not action.help]
    assert undocumented == []
    names = {name for name, _ in _commands(build_parser())}
    assert {"hybridad data check", "hybridad demo", "hybridad convert", "hybridad report",
            "hybridad submission write", "hybridad submission check", "hybridad submission pack"} <= names


def test_train_help_names_the_config_keys_and_resume(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    needles = ("resume=latest", "resume=<run dir>", "data.*", "threshold.*", "trainer.*", "--show-config")
    for needle in needles:
        assert needle in text


def test_train_show_config_prints_every_key_and_trains_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    with pytest.raises(SystemExit) as done:
        main(["train", "--show-config", "data.category=vial", "threshold.k=2.5"])
    assert done.value.code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["branch"] == "cpr" and shown["resume"] == "" and shown["threshold"]["k"] == 2.5
    groups = {"data", "inp_former", "cpr", "postprocess", "threshold", "trainer", "logging", "checkpoint"}
    assert groups <= set(shown)
