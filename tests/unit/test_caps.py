"""XEP-0115 caps hashes as Vertebra computes them (agents/caps.py): the specification's own examples,
and the same hash slixmpp's caps plugin gives for what an agent advertises."""

from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET

from slixmpp.plugins.xep_0004.stanza import FieldOption, Form, FormField
from slixmpp.plugins.xep_0030.stanza import DiscoInfo
from slixmpp.xmlstream import register_stanza_plugin

from agents import caps

# What the xep_0004 and xep_0128 plugins register when an agent loads them.
register_stanza_plugin(FormField, FieldOption, iterable=True)
register_stanza_plugin(Form, FormField, iterable=True)
register_stanza_plugin(DiscoInfo, Form, iterable=True)

FEATURES = """
    <feature var='http://jabber.org/protocol/caps'/>
    <feature var='http://jabber.org/protocol/disco#info'/>
    <feature var='http://jabber.org/protocol/disco#items'/>
    <feature var='http://jabber.org/protocol/muc'/>"""

# XEP-0115 5.2, the simple example.
SIMPLE = f"""<query xmlns='http://jabber.org/protocol/disco#info'>
    <identity category='client' name='Exodus 0.9.1' type='pc'/>{FEATURES}
</query>"""

# XEP-0115 5.3, the complex example: two identities in two languages, an extended form, and the
# features listed out of order.
COMPLEX = """<query xmlns='http://jabber.org/protocol/disco#info'>
    <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
    <identity xml:lang='el' category='client' name='\u03a8 0.11' type='pc'/>
    <feature var='http://jabber.org/protocol/muc'/>
    <feature var='http://jabber.org/protocol/caps'/>
    <feature var='http://jabber.org/protocol/disco#items'/>
    <feature var='http://jabber.org/protocol/disco#info'/>
    <x xmlns='jabber:x:data' type='result'>
      <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
      <field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field>
      <field var='os'><value>Mac</value></field>
      <field var='os_version'><value>10.5.1</value></field>
      <field var='software'><value>Psi</value></field>
      <field var='software_version'><value>0.11</value></field>
    </x>
</query>"""


def info(text: str) -> DiscoInfo:
    return DiscoInfo(xml=ET.fromstring(text))


def test_the_specifications_examples():
    assert caps.verstring(info(SIMPLE)) == "QgayPKawpkPSDYmwT/WM94uAlu0="
    assert caps.verstring(info(COMPLEX)) == "q07IKJEyjvHSyhy//CH0CxmKi8w="


def test_a_form_without_form_type_is_left_out_and_unknown_hashes_are_refused():
    no_type = COMPLEX.replace("<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo"
                              "</value></field>", "")
    without_form = COMPLEX[:COMPLEX.index("<x ")] + "</query>"
    assert caps.verstring(info(no_type)) == caps.verstring(info(without_form))
    assert caps.verstring(info(SIMPLE), "md5") is None and caps.verstring(info(SIMPLE), "sha1") is None


async def test_an_agents_hash_is_the_one_slixmpps_plugin_gives(tmp_path):
    """What every agent advertises (identity, op features, the agent form) hashes as before."""
    from slixmpp import ClientXMPP

    from agents.actor import Endpoint
    from agents.agent import Agent

    endpoint = Endpoint("127.0.0.1", 5222, "example.net", ssl.create_default_context())
    agent = Agent("probe@example.net", "secret", endpoint, resources=["/host/probe"])  # its form and identity
    local = await agent.xmpp.plugin["xep_0030"].get_info(local=True)
    reference = ClientXMPP("ref@example.net", "x")
    reference.register_plugin("xep_0115")
    assert caps.verstring(local) == reference.plugin["xep_0115"].generate_verstring(local, "sha-1")
    assert "xep_0115" not in agent.xmpp.plugin  # the plugin's filter and presence handler are not there
