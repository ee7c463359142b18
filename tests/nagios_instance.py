"""A real Nagios 4 (Debian nagios4-core) for tests: a tiny config in a directory, run as a plain
foreground process, its status read from status.dat. Never the system service. Started as root, it
drops to ``user``/``group`` (``nagios_user``/``nagios_group``), as the service does, and runs its
plugins as that user."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NAGIOS = shutil.which("nagios4") or "/usr/sbin/nagios4"

_MAIN = """\
log_file={d}/nagios.log
cfg_file={d}/objects.cfg
status_file={d}/status.dat
command_file={d}/nagios.cmd
check_external_commands=1
command_check_interval=-1
check_result_path={d}/checkresults
temp_file={d}/nagios.tmp
temp_path={d}/tmp
lock_file={d}/nagios.lock
object_cache_file={d}/objects.cache
precached_object_file={d}/objects.precache
state_retention_file={d}/retention.dat
retain_state_information=0
nagios_user={user}
nagios_group={group}
interval_length=1
status_update_interval=1
check_result_reaper_frequency=1
max_service_check_spread=1
max_host_check_spread=1
enable_notifications=0
use_syslog=0
illegal_macro_output_chars=`~$&|<>
"""

# Everything a host or service needs that the tests do not care about.
_BASE = """\
define command {
  command_name host-up
  command_line /usr/lib/nagios/plugins/check_dummy 0 up
}
define timeperiod {
  timeperiod_name always
  alias always
  sunday 00:00-24:00
  monday 00:00-24:00
  tuesday 00:00-24:00
  wednesday 00:00-24:00
  thursday 00:00-24:00
  friday 00:00-24:00
  saturday 00:00-24:00
}
define contact {
  contact_name nobody
  host_notifications_enabled 0
  service_notifications_enabled 0
  host_notification_period always
  service_notification_period always
  host_notification_options n
  service_notification_options n
  host_notification_commands host-up
  service_notification_commands host-up
}
"""


def host(name: str) -> str:
    return (f"define host {{\n  host_name {name}\n  address 127.0.0.1\n  check_command host-up\n"
            "  max_check_attempts 1\n  check_interval 300\n  check_period always\n"
            "  notification_period always\n  contacts nobody\n}\n")


def service(host_name: str, description: str, command: str, *, active: bool = True) -> str:
    return (f"define service {{\n  host_name {host_name}\n  service_description {description}\n"
            f"  check_command {command}\n  max_check_attempts 1\n  check_interval 2\n  retry_interval 1\n"
            f"  active_checks_enabled {int(active)}\n  passive_checks_enabled 1\n  check_freshness 0\n"
            "  check_period always\n  notification_period always\n  contacts nobody\n}\n")


def command(name: str, line: str) -> str:
    return f"define command {{\n  command_name {name}\n  command_line {line}\n}}\n"


class Nagios:
    def __init__(self, directory: Path, objects: str, user: str = "root", group: str = "root") -> None:
        self.dir = directory
        (directory / "checkresults").mkdir(parents=True, exist_ok=True)
        (directory / "tmp").mkdir(exist_ok=True)
        self.config = directory / "nagios.cfg"
        self.config.write_text(_MAIN.format(d=directory, user=user, group=group))
        (directory / "objects.cfg").write_text(_BASE + objects)
        if user != "root":  # Nagios drops to that user at start, and writes its files there as it
            import grp
            import pwd

            uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
            for path in (directory, directory / "checkresults", directory / "tmp"):
                os.chown(path, uid, gid)
        self.command_file = directory / "nagios.cmd"
        self.proc: subprocess.Popen[bytes] | None = None

    def verify(self) -> str:
        out = subprocess.run([NAGIOS, "-v", str(self.config)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"nagios4 -v refused the config:\n{out.stdout}")
        return out.stdout

    def start(self) -> None:
        self.proc = subprocess.Popen([NAGIOS, str(self.config)], stdout=open(self.dir / "stdout.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not self.command_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nagios did not start: {(self.dir / 'nagios.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def services(self) -> dict[tuple[str, str], dict[str, str]]:
        """The servicestatus blocks of status.dat, by (host, service)."""
        try:
            text = (self.dir / "status.dat").read_text()
        except FileNotFoundError:
            return {}
        found = {}
        for block in text.split("servicestatus {")[1:]:
            fields = dict(line.strip().split("=", 1) for line in block.split("}", 1)[0].splitlines()
                          if "=" in line)
            found[(fields.get("host_name", ""), fields.get("service_description", ""))] = fields
        return found

    def log(self) -> str:
        return (self.dir / "nagios.log").read_text() if (self.dir / "nagios.log").exists() else ""
