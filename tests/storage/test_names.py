"""Object names that reach the file system: only safe names pass, with a message saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.errors import InvalidArgument
from retrieval.storage.names import MAX_NAME_LEN, child_path, validate_name


@pytest.mark.parametrize("name", ["a", "A1", "docs", "my_col-2.v1", "0start", "x" * MAX_NAME_LEN, "a..b", "a.",
                                  "Z_" + "9" * 126])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name,words", [
    ("", "must not be empty"),
    ("x" * (MAX_NAME_LEN + 1), "129 characters long; the limit is 128"),
    ("..", "not valid"),
    (".", "not valid"),
    (".hidden", "not valid"),
    ("../etc", "not valid"),
    ("a/b", "not valid"),
    ("a\\b", "not valid"),
    ("/abs", "not valid"),
    ("/", "not valid"),
    ("a\0b", "not valid"),
    ("_a", "not valid"),
    ("-a", "not valid"),
    ("a b", "not valid"),
    ("a\nb", "not valid"),
    ("caf\u00e9", "not valid"),
    ("\u0430dmin", "not valid"),       # Cyrillic a, a look-alike of Latin a
    ("a\u2215b", "not valid"),         # division slash, a look-alike of /
    ("\uff0e\uff0e", "not valid"),     # fullwidth full stops
    ("a\u200bb", "not valid"),         # zero-width space
    ("name\U0001F600", "not valid"),
])
def test_invalid_names(name, words):
    with pytest.raises(InvalidArgument, match=words) as e:
        validate_name(name, "collection name")
    assert "collection name" in str(e.value)


def test_message_shows_escaped_name():
    with pytest.raises(InvalidArgument) as e:
        validate_name("a\0b")
    assert "\\x00" in str(e.value) and "\0" not in str(e.value)


@pytest.mark.parametrize("name", [None, 5, b"abc", ["a"], 1.5])
def test_non_string(name):
    with pytest.raises(InvalidArgument, match="must be a string"):
        validate_name(name)


def test_child_path_stays_inside(tmp_path: Path):
    assert child_path(tmp_path, "abc") == (tmp_path / "abc").resolve()
    for bad in ("..", "../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(InvalidArgument):
            child_path(tmp_path, bad)
