"""A deliberately independent XMPP client for attack tests, written from RFC 6120 and docs/protocol.md.

It shares nothing with the project's runtime (no slixmpp, no ``agents``): it opens a socket, upgrades
with STARTTLS, logs in with SCRAM-SHA-1, binds a resource and then sends whatever XML text a test
gives it, of any depth or size, so that tests see the mesh the way another account on the server
does. Received stanzas are parsed with the standard library's pull parser and handed out as
ElementTree elements in Clark notation (``{jabber:client}iq``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import os
import ssl
import xml.etree.ElementTree as ET
from typing import Any, Callable, Iterable
from xml.sax.saxutils import quoteattr

import msgpack

NS_CLIENT = "jabber:client"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_VERTEBRA = "urn:vertebra:1"
_ids = itertools.count(1)


def encode_args(args: Any) -> str:
    """Arguments as the protocol carries them: base64 of msgpack (docs/protocol.md section 3.1)."""
    return base64.b64encode(msgpack.packb(args, use_bin_type=True)).decode()


def decode_payload(text: str | None) -> Any:
    return msgpack.unpackb(base64.b64decode(text), raw=False) if text else None


def scram_keys(password: str, salt: str, iterations: int) -> tuple[bytes, bytes]:
    """RFC 5802's ClientKey and StoredKey for ``password``, the server's salt (base64) and iterations."""
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), base64.b64decode(salt), iterations)
    client_key = hmac.new(salted, b"Client Key", "sha1").digest()
    return client_key, hashlib.sha1(client_key).digest()


def scram_final(client_first_bare: str, server_first: str, nonce: str,
                keys: Callable[[str, int], tuple[bytes, bytes]]) -> str:
    """The SCRAM-SHA-1 client-final-message (RFC 5802, no channel binding) answering ``server_first``;
    ``keys(salt, iterations)`` gives (ClientKey, StoredKey). ValueError when the server's nonce does not
    extend ``nonce``. Shared with bench/scale.py's simulated agents."""
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    if not fields["r"].startswith(nonce):
        raise ValueError("the server nonce does not extend ours")
    client_key, stored_key = keys(fields["s"], int(fields["i"]))
    without_proof = f"c=biws,r={fields['r']}"
    signature = hmac.new(stored_key, f"{client_first_bare},{server_first},{without_proof}".encode(), "sha1").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    return f"{without_proof},p={proof}"


class XMPPError(Exception):
    pass


class RawXMPP:
    """One logged-in stream. Use :meth:`login`; every received stanza lands in an inbox that
    :meth:`next` searches, so nothing a test did not ask for is lost or blocks the reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, domain: str) -> None:
        self.reader, self.writer, self.domain = reader, writer, domain
        self.jid = ""
        self.inbox: list[ET.Element] = []
        self._arrived = asyncio.Event()
        self._closed = False
        self._parser: ET.XMLPullParser | None = None
        self._depth = 0
        self._pump: asyncio.Task[None] | None = None

    # -- login ------------------------------------------------------------------------------------

    @classmethod
    async def login(cls, host: str, port: int, domain: str, user: str, password: str, *,
                    ssl_context: ssl.SSLContext, resource: str = "raw", timeout: float = 10.0) -> "RawXMPP":
        """Connect, STARTTLS, SCRAM-SHA-1, bind ``resource``. ``user`` may be a bare JID or a localpart."""
        local = user.split("@", 1)[0]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self = cls(reader, writer, domain)
        try:
            await asyncio.wait_for(self._negotiate(local, password, resource, ssl_context), timeout)
        except BaseException:
            writer.close()
            raise
        self._pump = asyncio.get_running_loop().create_task(self._read_forever())
        return self

    async def _negotiate(self, user: str, password: str, resource: str, ctx: ssl.SSLContext) -> None:
        features = await self._open_stream()
        if features.find(f"{{{NS_TLS}}}starttls") is None:
            raise XMPPError("server offers no STARTTLS")
        self._write(f"<starttls xmlns='{NS_TLS}'/>")
        answer = await self._read_element()
        if answer.tag != f"{{{NS_TLS}}}proceed":
            raise XMPPError(f"STARTTLS refused: {answer.tag}")
        await self.writer.start_tls(ctx, server_hostname=self.domain)
        features = await self._open_stream()
        mechs = [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
        if "SCRAM-SHA-1" not in mechs:
            raise XMPPError(f"no SCRAM-SHA-1 among {mechs}")
        await self._scram_sha1(user, password)
        features = await self._open_stream()
        if features.find(f"{{{NS_BIND}}}bind") is None:
            raise XMPPError("server offers no resource binding")
        self._write(f"<iq type='set' id='bind'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>")
        reply = await self._read_element()
        jid = reply.find(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
        if reply.get("type") != "result" or jid is None:
            raise XMPPError(f"bind failed: {ET.tostring(reply)[:200]!r}")
        self.jid = jid.text or ""

    async def _scram_sha1(self, user: str, password: str) -> None:
        # RFC 5802, without channel binding ("n,,").
        nonce = base64.b64encode(os.urandom(18)).decode()
        bare = f"n={user.replace('=', '=3D').replace(',', '=2C')},r={nonce}"
        self._write(f"<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>"
                    f"{base64.b64encode(('n,,' + bare).encode()).decode()}</auth>")
        challenge = await self._read_element()
        if challenge.tag != f"{{{NS_SASL}}}challenge":
            raise XMPPError(f"SASL: expected a challenge, got {challenge.tag}")
        server_first = base64.b64decode(challenge.text or "").decode()
        try:
            final = scram_final(bare, server_first, nonce, lambda salt, i: scram_keys(password, salt, i))
        except ValueError as exc:
            raise XMPPError(f"SASL: {exc}") from None
        self._write(f"<response xmlns='{NS_SASL}'>{base64.b64encode(final.encode()).decode()}</response>")
        outcome = await self._read_element()
        if outcome.tag != f"{{{NS_SASL}}}success":
            raise XMPPError(f"SASL failed: {ET.tostring(outcome)[:200]!r}")

    async def _open_stream(self) -> ET.Element:
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._write(f"<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAM}'"
                    f" to='{self.domain}' version='1.0'>")
        features = await self._read_element()
        if features.tag != f"{{{NS_STREAM}}}features":
            raise XMPPError(f"expected stream features, got {features.tag}")
        return features

    # -- reading ----------------------------------------------------------------------------------

    async def _read_element(self) -> ET.Element:
        """The next complete top-level element of the stream (during login, before the pump runs)."""
        while True:
            for element in self._parsed():
                return element
            data = await self.reader.read(65536)
            if not data:
                raise XMPPError("the server closed the stream")
            assert self._parser is not None
            self._parser.feed(data)

    def _parsed(self) -> Iterable[ET.Element]:
        assert self._parser is not None
        for event, element in self._parser.read_events():
            if event == "start":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1:  # a child of <stream:stream>: one stanza
                    yield element

    async def _read_forever(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                assert self._parser is not None
                self._parser.feed(data)
                for element in self._parsed():
                    self.inbox.append(element)
                    self._arrived.set()
        except (OSError, ET.ParseError, asyncio.CancelledError):
            pass
        finally:
            self._closed = True
            self._arrived.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def next(self, pred: Callable[[ET.Element], bool] = lambda e: True, timeout: float = 10.0) -> ET.Element:
        """Take the first received stanza for which ``pred`` is true, waiting up to ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for i, element in enumerate(self.inbox):
                if pred(element):
                    return self.inbox.pop(i)
            if self._closed:
                raise XMPPError("the stream closed while waiting")
            self._arrived.clear()
            remaining = end - loop.time()
            if remaining <= 0:
                raise TimeoutError("no matching stanza arrived in time")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                raise TimeoutError("no matching stanza arrived in time") from None

    # -- writing ----------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self.writer.write(text.encode())

    async def send(self, xml: str) -> None:
        """Send ``xml`` exactly as given."""
        self._write(xml)
        await self.writer.drain()

    async def iq(self, to: str, inner: str, *, type: str = "set", timeout: float = 10.0) -> ET.Element:
        """Send an IQ holding ``inner`` and return its result or error."""
        iq_id = f"raw{next(_ids)}"
        await self.send(f"<iq type={quoteattr(type)} id={quoteattr(iq_id)} to={quoteattr(to)}>{inner}</iq>")
        return await self.next(lambda e: e.tag == f"{{{NS_CLIENT}}}iq" and e.get("id") == iq_id
                               and e.get("type") in ("result", "error"), timeout)

    @staticmethod
    def op_xml(op: str, args: Any = None, *, rid: str | None = None, on: Iterable[str] = (),
               timeout_ms: int | None = None, for_: str | None = None, attrs: dict[str, str] | None = None) -> str:
        """A Vertebra request element (docs/protocol.md section 6)."""
        fields = {"name": op, "rid": rid or f"rid{next(_ids)}-{os.getpid()}"}
        if timeout_ms is not None:
            fields["timeout"] = str(timeout_ms)
        if on:
            fields["on"] = " ".join(on)
        if for_:
            fields["for"] = for_
        fields.update(attrs or {})
        attributes = " ".join(f"{k}={quoteattr(v)}" for k, v in fields.items())
        body = encode_args(args) if args is not None else ""
        return f"<op xmlns='{NS_VERTEBRA}' {attributes}>{body}</op>"

    async def presence(self, to: str | None = None, extra_xml: str = "", type: str | None = None) -> None:
        attributes = (f" to={quoteattr(to)}" if to else "") + (f" type={quoteattr(type)}" if type else "")
        await self.send(f"<presence{attributes}>{extra_xml}</presence>")

    async def alive(self, timeout: float = 5.0) -> bool:
        """Whether the server still answers us (XEP-0199 ping to the domain)."""
        if self._closed:
            return False
        try:
            reply = await self.iq(self.domain, "<ping xmlns='urn:xmpp:ping'/>", type="get", timeout=timeout)
        except (TimeoutError, XMPPError, OSError):
            return False
        return reply.get("type") == "result"

    async def close(self) -> None:
        if not self._closed:
            try:
                await self.send("</stream:stream>")
            except OSError:
                pass
        if self._pump is not None:
            self._pump.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def app_condition(reply: ET.Element) -> str | None:
    """The Vertebra application condition of an error reply (docs/protocol.md section 10), if any."""
    error = reply.find(f"{{{NS_CLIENT}}}error")
    if error is None:
        return None
    for child in error:
        if child.tag.startswith(f"{{{NS_VERTEBRA}}}"):
            return child.tag.split("}", 1)[1]
    return None


def outcome_of(reply: ET.Element) -> tuple[str, Any]:
    """(status, decoded payload) of a quick op's result."""
    outcome = reply.find(f"{{{NS_VERTEBRA}}}outcome")
    if outcome is None:
        raise XMPPError(f"no <outcome/> in {ET.tostring(reply)[:300]!r}")
    return outcome.get("status", ""), decode_payload(outcome.text)
