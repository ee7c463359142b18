"""Name validation: safe names pass unchanged, every path trick is refused with a reason."""

import pytest

from agents.storage.driver import StorageError
from agents.storage.names import validate_name


@pytest.mark.parametrize("name", ["db", "pg-main_01", "snap.2024-05-01", "A" * 64, "9lives"])
def test_safe_names_pass_unchanged(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("../etc", "'..'"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    (".hidden", "starts with '.'"),
    ("a..b", "'..'"),
    ("nul\0byte", "control character"),
    ("tab\there", "control character"),
    ("x" * 65, "65 characters"),
    ("-flag", "must start with a letter or digit"),
    ("sp ace", "' '"),
    ("ünï", "'ï'"),
])
def test_bad_names_refused_with_reason(name, reason):
    with pytest.raises(StorageError) as err:
        validate_name(name, "volume name")
    assert err.value.code == "invalid"
    assert reason in str(err.value)
    assert "volume name" in str(err.value)


def test_non_string_refused():
    with pytest.raises(StorageError, match="must be a string"):
        validate_name(42)
