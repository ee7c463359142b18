"""The SCRAM and XML-escape replacements give slixmpp's own answers, and stand in only for the slixmpp
functions they were written against: an upgrade that changes either fails here, loudly."""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
from importlib.metadata import version

import pytest
from packaging.specifiers import SpecifierSet
from slixmpp.util.sasl import mechanisms

from agents import actor  # noqa: F401  (importing the actor installs the replacements)
from agents import xmpp_speedups as speedups

_tostring = importlib.import_module("slixmpp.xmlstream.tostring")


def _source_hash(func) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()


def test_installed_slixmpp_is_in_the_range_checked() -> None:
    assert version("slixmpp") in SpecifierSet(speedups.SLIXMPP_RANGE), (
        f"slixmpp {version('slixmpp')} is outside {speedups.SLIXMPP_RANGE}: check the functions in"
        " agents/xmpp_speedups.py against the new release, then widen the range there and in pyproject.toml")


def _original(name: str):
    """slixmpp's own function of that name, as it was before install() replaced any."""
    replaced = {"slixmpp.util.sasl.mechanisms.SCRAM.Hi": speedups.ORIGINAL_HI,
                "slixmpp.xmlstream.tostring.escape": speedups.ORIGINAL_ESCAPE}
    if name in replaced:
        return replaced[name]
    module, cls, func = name.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), cls), func)


@pytest.mark.parametrize("name", sorted(speedups.ORIGINALS))
def test_the_slixmpp_functions_stood_in_for_are_the_ones_written_against(name) -> None:
    assert _source_hash(_original(name)) == speedups.ORIGINALS[name], (
        f"slixmpp's {name} changed: compare it with what stands in for it (agents/xmpp_speedups.py,"
        " agents/fanout.py, the actor's stream), then record the new source hash in ORIGINALS")


def test_replacements_are_installed_where_slixmpp_looks_them_up() -> None:
    assert mechanisms.SCRAM.Hi is speedups.scram_hi
    assert _tostring.escape is speedups.escape
    # tostring finds escape as a module global at call time; a direct import would bypass the replacement.
    assert "escape" in _tostring.tostring.__code__.co_names


class _Scram:
    """Enough of a SCRAM mechanism object for Hi(): its hash and HMAC."""

    def __init__(self, name: str) -> None:
        self.hash = getattr(hashlib, name)

    def HMAC(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("password, salt, iterations", [(b"pencil", b"QSXCR+Q6sek8bf92", 4096),
                                                        (b"", b"s", 1), (b"p\xc3\xa4ss", bytes(range(32)), 17)])
def test_scram_hi_matches_slixmpp(hash_name, password, salt, iterations) -> None:
    mech = _Scram(hash_name)
    assert speedups.scram_hi(mech, password, salt, iterations) == speedups.ORIGINAL_HI(mech, password, salt,
                                                                                       iterations)


@pytest.mark.parametrize("text", ["", "plain", "a & b < c > d 'e' \"f\"", "&amp;", "]]> <![CDATA[", "ünï©ødé \x00",
                                  "<" * 1000, "x" * 65536 + "&"])
@pytest.mark.parametrize("use_cdata", [False, True])
def test_escape_matches_slixmpp(text, use_cdata) -> None:
    assert speedups.escape(text, use_cdata) == speedups.ORIGINAL_ESCAPE(text, use_cdata)
