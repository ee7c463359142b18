#!/usr/bin/env bash
# Set up everything Vertebra needs on a Debian 12 machine, from nothing: the Debian packages of the
# real parts (Prosody, check plugins, fence agents, Pacemaker, btrfs tools) and the project's virtualenv.
# Idempotent: a second run checks and returns in well under a second. Run from anywhere; needs root
# (or sudo) only when a Debian package or the group vertebra (the gateway socket's) is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Every package here exists in Debian 12 (bookworm); checked with apt-cache policy.
PACKAGES=(
    prosody                    # the private XMPP server (agents/server.py), never its system service
    openssl                    # the private server's self-signed certificate
    python3 python3-venv python3-pip
    monitoring-plugins-basic   # real check plugins for the monitor agent
    fence-agents               # real fence agents (fence_dummy) for the fencing agent
    libxml2-utils              # xmllint, to validate fence agent metadata
    btrfs-progs                # the btrfs storage driver
    pacemaker-cli-utils        # stonith_admin
    pacemaker                  # the standalone fencer, pacemaker-fenced
    nagios4-core               # Nagios runs check_vertebra in the end-to-end test
    nagios-nrpe-server nagios-nrpe-plugin   # NRPE, the baseline bench/checks.py measures against
    ejabberd                   # the clustered XMPP server for scale-out (agents/ejabberd.py)
    sqlite3                    # the demo masking hook (deploy/masking/sqlite-mask) runs SQL over a clone
    etcd-server                # brokers on several machines share state through etcd (broker/state_etcd.py)
)
# More packages for one machine or job: VERTEBRA_EXTRA_PACKAGES="pkg1 pkg2".
read -r -a EXTRA <<< "${VERTEBRA_EXTRA_PACKAGES:-}"
PACKAGES+=("${EXTRA[@]}")
VENV="$ROOT/.venv"
STAMP="$VENV/.vertebra-installed"

say() { printf 'install: %s\n' "$*"; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "install: missing Debian packages need root: run 'make install' as root or install sudo" >&2
        exit 1
    fi
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "Debian packages present"
        return
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install: apt-get not found; Vertebra's set-up expects Debian 12. Missing: ${missing[*]}" >&2
        exit 1
    fi
    say "installing ${missing[*]}"

    # Keep package scripts from starting system services (above all Prosody on port 5222): the
    # mesh runs its own private instance. Only add a policy-rc.d if the machine has none.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    # shellcheck disable=SC2064  # expand now: the trap must remove exactly what was added
    trap "[ $added_policy -eq 0 ] || as_root rm -f $policy" EXIT

    export DEBIAN_FRONTEND=noninteractive
    local log
    log="$(mktemp)"
    if ! { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
            >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "install: apt-get failed (full output in $log); fix the cause above and run 'make install' again" >&2
        exit 1
    fi
    rm -f "$log"

    if [ $added_policy -eq 1 ]; then
        as_root rm -f "$policy"
    fi
    trap - EXIT

    # System services we just installed must not come up on boot either: the mesh runs its own
    # Prosody or ejabberd nodes, and the tests and benchmarks start Nagios and NRPE as plain processes.
    local pair package service
    # etcd's package starts a single-member etcd on 2379 that the mesh never uses: the operator runs
    # the cluster (deploy/etcd/), and the tests run a private one (tests/etcd_cluster.py).
    for pair in prosody:prosody nagios4-core:nagios4 nagios-nrpe-server:nagios-nrpe-server ejabberd:ejabberd \
            etcd-server:etcd; do
        package="${pair%%:*}" service="${pair#*:}"
        printf '%s\n' "${missing[@]}" | grep -qx "$package" || continue
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
        elif command -v update-rc.d >/dev/null 2>&1; then
            as_root update-rc.d "$service" disable >/dev/null 2>&1 || true
            as_root "/etc/init.d/$service" stop >/dev/null 2>&1 || true
        fi
        say "system $service service disabled (Vertebra starts its own when it needs one)"
    done
}

install_group() {
    # Members of this group may connect to the local gateway socket (agents/gateway.py), each as the
    # identity the mesh file maps its Unix user to: add the users of programs that call the mesh,
    # e.g. `usermod -aG vertebra nagios` (docs/nagios.md).
    if getent group vertebra >/dev/null; then
        say "group vertebra present"
        return
    fi
    as_root groupadd --system vertebra
    say "group vertebra created (add the users whose programs call the mesh: usermod -aG vertebra nagios)"
}

install_venv() {
    # A venv made earlier from another interpreter (a pyenv one under /root, say) is made again: user
    # nagios could not run its python at all, and Debian's is what the project is tested with.
    made_from=$(sed -n 's/^home = //p' "$VENV/pyvenv.cfg" 2>/dev/null || true)
    if [ -x "$VENV/bin/python" ] && [ "$made_from" != /usr/bin ]; then
        say "$VENV was made from ${made_from:-an unknown python}, not Debian's /usr/bin/python3: making it again"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        # Debian's interpreter, not whichever python3 comes first on PATH (a pyenv one under /root, say):
        # Nagios runs check_vertebra as user nagios, which must be able to execute the venv's python.
        /usr/bin/python3 -m venv "$VENV"
    fi
    # Newer project metadata or a newer way of installing it (this script): install again.
    if [ ! -e "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/deploy/install.sh" -nt "$STAMP" ]; then
        say "installing vertebra, its etcd client and its test and benchmark dependencies into $VENV"
        # compat: a path entry, not an import hook that every program (check_vertebra from Nagios,
        # fence_vertebra from Pacemaker) would pay ~8 ms to load at start.
        "$VENV/bin/python" -m pip install -q -e "$ROOT[test,etcd,bench]" --config-settings editable_mode=compat
        touch "$STAMP"
    else
        say "virtualenv up to date"
    fi
    # The project is installed in place, so its bytecode lives beside the sources, where user nagios (and a
    # Pacemaker run with PYTHONDONTWRITEBYTECODE set) cannot write it: without this, a program started after
    # the sources changed compiles every changed module again at each start. Only what is stale is written.
    "$VENV/bin/python" -m compileall -q -j 0 "$ROOT/agents" "$ROOT/broker" "$ROOT/rbac" >/dev/null
}

install_packages
install_group
install_venv
say "done"
