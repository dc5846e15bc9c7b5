"""The config corpus: every file in corpus/ has an expected outcome in corpus/EXPECTED.yaml."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from zeroplan.schemas import ConfigError, ConfigWarning, load_config

CORPUS = Path(__file__).parent / "corpus"
EXPECTED = yaml.safe_load((CORPUS / "EXPECTED.yaml").read_text())
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name != "EXPECTED.yaml")


def test_every_file_has_an_expectation_and_vice_versa():
    assert sorted(EXPECTED) == FILES


def test_corpus_is_large_enough():
    assert len(FILES) >= 40
    assert sum(e["outcome"] == "error" for e in EXPECTED.values()) >= 20


@pytest.mark.parametrize("name", FILES)
def test_corpus_file(name):
    expected = EXPECTED[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_config(CORPUS / name)
        except ConfigError as e:
            assert expected["outcome"] == "error", f"unexpected error:\n{e}"
            rendered = [p.render() for p in e.problems]
            assert any(expected["fragment"] in r for r in rendered), rendered
            assert name in str(e)  # the message names the file
            return
    notices = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert expected["outcome"] != "error", f"{name} loaded but an error was expected"
    if expected["outcome"] == "valid":
        assert notices == []
    else:
        assert any(expected["fragment"] in n for n in notices), notices
