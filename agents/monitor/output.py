"""Plugin output split the way Nagios 4 splits it: short text, long output, perfdata.

The first line splits at its first ``|`` into the short text and perfdata. Following lines are long
output until a line containing ``|``: its part before the bar ends the long output, and its part
after the bar, with every later line, is perfdata. Short text and perfdata are stripped of spaces,
tabs and line ends; long output is kept as written (Nagios 4 ``parse_check_output``).

Written back (``PluginOutput.render``), the bar follows the text with no space before it, and a bar
inside the text or long output is written as ``states.BAR_IN_TEXT``: only perfdata follows a ``|``.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.monitor import perfdata as perfdata_grammar
from agents.monitor.states import plain_text

__all__ = ["PluginOutput", "parse_output"]

_STRIP = " \t\r\n"


@dataclass(frozen=True)
class PluginOutput:
    """Parsed plugin output. ``perfdata`` is the raw text Nagios keeps as ``$SERVICEPERFDATA$``."""

    text: str
    long_text: str = ""
    perfdata: str = ""

    @property
    def metrics(self) -> perfdata_grammar.Perfdata:
        """``perfdata`` parsed into items (bad items are listed in ``.errors``)."""
        return perfdata_grammar.parse(self.perfdata)

    def render(self) -> str:
        """Plugin output that parses back to this object, for relaying a result as a plugin."""
        text, long_text = plain_text(self.text), plain_text(self.long_text)
        first = f"{text}|{self.perfdata}" if self.perfdata else text
        return f"{first}\n{long_text}" if long_text else first


def parse_output(output: str) -> PluginOutput:
    """Split raw plugin stdout into short text, long text and perfdata as Nagios 4 does."""
    lines = output.split("\n")
    # Nagios uses strtok on the first line, which skips leading bars before the text.
    text, _, perf = lines[0].lstrip("|").partition("|")
    long_text = ""
    in_perfdata = False
    for number, line in enumerate(lines[1:], start=2):
        if in_perfdata:
            perf += line + " "
        elif "|" in line:
            before, _, after = line.partition("|")
            if number > 2:
                long_text += "\n"
            long_text += before
            if after:
                # Nagios glues this straight onto first-line perfdata ("a=1b=2"); like Naemon,
                # keep a space between so both items survive.
                if perf and not perf[-1].isspace() and not after[0].isspace():
                    perf += " "
                perf += after + " "
            in_perfdata = True
        else:
            if number > 2:
                long_text += "\n"
            long_text += line
    return PluginOutput(text.strip(_STRIP), long_text, perf.strip(_STRIP))
