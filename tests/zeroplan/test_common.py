"""The CLI's error and notice handling."""

from __future__ import annotations

import warnings

import pytest
import typer

from zeroplan.commands.common import EXIT_USER_ERROR, user_errors
from zeroplan.schemas import ConfigError, ConfigWarning


def test_notices_are_printed_once_and_other_warnings_pass_through(capsys, recwarn):
    @user_errors
    def command():
        for _ in range(3):
            warnings.warn("key x has no effect", ConfigWarning)
        warnings.warn("something else", UserWarning)
        return "done"

    assert command() == "done"
    err = capsys.readouterr().err
    assert err.count("notice: key x has no effect") == 1
    # re-shown through warnings.showwarning (here pytest's recorder), once, without looping
    assert [str(w.message) for w in recwarn] == ["something else"]


def test_config_error_exits_2_and_still_prints_notices(capsys):
    @user_errors
    def command():
        warnings.warn("deprecated key read", ConfigWarning)
        raise ConfigError("bad value")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "error: 1 problem(s) in config:" in err and "notice: deprecated key read" in err
