"""The Vertebra runtime every participant stands on.

Agents, the broker and every client are actors on one XMPP connection each (``actor``). Ops are
declared once (``ops``) and that declaration drives validation, capability advertisement and help.
The wire format lives in ``protocol``; agents serve ops (``agent``), clients call them (``client``),
short-lived programs reach the mesh through a local agent's Unix socket (``gateway``), the private
XMPP server is started by ``server``, and one YAML mesh file configures everything (``config``).
The agent kinds live in the sub-packages ``storage``, ``fencing`` and ``monitor``.
"""

__version__ = "0.1.0"
