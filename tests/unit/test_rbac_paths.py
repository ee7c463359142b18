"""Resource paths and op names: refused, never normalized into a match; patterns without regex."""

from __future__ import annotations

import pytest

from rbac.ops import BadOpPattern, check_op_pattern, is_op_name, match_op
from rbac.paths import BadPath, check_path, check_pattern, match_pattern


@pytest.mark.parametrize("bad", ["/host/../etc", "/host/./db", "/host//db", "/host/%2e%2e", "/host/db%00",
                                 "/h\x00st", "/h\u043est", "/host/db1\n", "/host/db1/", "host/db1",
                                 "/host/\uff44b1", "/host/db 1"])
def test_bad_paths_are_refused(bad):
    with pytest.raises(BadPath):
        check_path(bad)


def test_the_segment_rule_says_the_same_as_a_pattern_and_as_character_sets():
    """rbac.segments writes the rule twice, side by side: the pattern op declarations advertise and
    the sets is_segment checks without re. Held to each other for every character."""
    import re

    from rbac import segments

    words = ["", "a" * 128, "a" * 129, "n1", "_x", "-x", "x-", "a.b:c@d+e-f", "node 1", "n\n", "é"]
    words += [f"{c}" for c in map(chr, range(0x180))] + [f"a{c}b" for c in map(chr, range(0x180))]
    for word in words:
        assert segments.is_segment(word) is bool(re.fullmatch(segments.PATTERN, word, re.ASCII)), repr(word)


def test_canonical_paths_pass_unchanged():
    assert check_path("/cluster/c1/node/3") == "/cluster/c1/node/3"
    assert check_path("/host/db1.example:5432") == "/host/db1.example:5432"


@pytest.mark.parametrize("pattern,path,expected", [
    ("/cluster/c1/node/*", "/cluster/c1/node/3", True),
    ("/cluster/c1/node/*", "/cluster/c1/node/3/disk", False),
    ("/cluster/c1/node/*", "/cluster/c10/node/3", False),
    ("/cluster/c1/node/*", "/cluster/c1/node", False),
    ("/cluster/c1/**", "/cluster/c1/node/3", True),
    ("/cluster/c1/**", "/cluster/c1", False),
    ("/cluster/c1/**", "/cluster/c12/x", False),
    ("/host/db.1", "/host/dbx1", False),  # '.' is a character, not a regex wildcard
])
def test_patterns_match_segment_by_segment(pattern, path, expected):
    assert match_pattern(check_pattern(pattern), path) is expected


@pytest.mark.parametrize("bad", ["/a/**/b", "/a/b*", "/a/../b", "a/*", "/a//b", "/a/.*"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(BadPath):
        check_pattern(bad)


def test_op_names_are_ascii_dotted_words_only():
    assert is_op_name("sample.echo")
    assert not is_op_name("sample.\u0435cho")  # Cyrillic e
    assert not is_op_name("sample.echo\n")
    assert not is_op_name("Sample.Echo")
    assert not is_op_name("sample")


@pytest.mark.parametrize("pattern,name,expected", [
    ("sample.echo", "sample.echo", True),
    ("sample.echo", "sample.echoes", False),
    ("storage.*", "storage.info", True),
    ("storage.*", "storage.snapshot.create", False),
    ("storage.**", "storage.snapshot.create", True),
    ("storage.**", "storage", False),
    ("*.info", "monitor.info", True),
    ("**", "anything.at.all", True),
    ("storage.**", "storagex.info", False),
])
def test_op_patterns_match_word_by_word(pattern, name, expected):
    assert match_op(check_op_pattern(pattern), name) is expected


@pytest.mark.parametrize("bad", ["*", "storage", "storage.*x", "storage.**.info", "storage.[a-z]+", "Storage.info",
                                 ""])
def test_bad_op_patterns_are_refused(bad):
    with pytest.raises(BadOpPattern):
        check_op_pattern(bad)
