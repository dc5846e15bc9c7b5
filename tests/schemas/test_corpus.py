"""The config corpus: every file in corpus/ has an expected outcome in corpus/EXPECTED.yaml, and
every real one (real_*) its source in corpus/SOURCES.yaml."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from zeroplan.schemas import ConfigError, ConfigWarning, load_config

CORPUS = Path(__file__).parent / "corpus"
EXPECTED = yaml.safe_load((CORPUS / "EXPECTED.yaml").read_text())
SOURCES = yaml.safe_load((CORPUS / "SOURCES.yaml").read_text())
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name not in ("EXPECTED.yaml", "SOURCES.yaml"))


def test_every_file_has_an_expectation_and_vice_versa():
    assert sorted(EXPECTED) == FILES


def test_every_real_config_names_its_source():
    assert sorted(SOURCES) == [f for f in FILES if f.startswith("real_")]
    assert all(set(s) == {"repo", "path", "commit"} and len(str(s["commit"])) == 40 for s in SOURCES.values())


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
