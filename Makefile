# The two commands of the README: `make run` brings a mesh up, `make test` runs every test.
# Both set the machine up first (deploy/install.sh), so they work on a fresh Debian 12 machine.

VENV := .venv
PYTHON := $(VENV)/bin/python
# Test processes per run (pytest-xdist; 0 runs the tests in pytest's own process). The tests mostly wait
# on sockets and child processes, so two share two cores well; each starts its own servers, and a test
# file's tests stay together (--dist loadfile) so that its module fixtures start once.
TEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install lint test test-prosody test-ejabberd test-cluster run bench clean

install:
	deploy/install.sh

# ruff and mypy (their settings are in pyproject.toml): a few seconds, before any test starts a server.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Every test, in three parts that each run whatever an earlier one found (the exit status is theirs
# together). The suite on Prosody and the integration tests again on a two-node ejabberd cluster run
# side by side: each starts its own servers on free ports, and both mostly wait on sockets, so together
# they take about as long as the longer one; the ejabberd part's output is printed when it ends. Then
# the cluster tests. Each part is also a target of its own.
test: lint
	@log=$$(mktemp); status=0; \
	$(MAKE) --no-print-directory test-ejabberd >"$$log" 2>&1 & ejabberd=$$!; \
	$(MAKE) --no-print-directory test-prosody || status=1; \
	wait $$ejabberd || status=1; \
	echo "=== make test-ejabberd"; cat "$$log"; rm -f "$$log"; \
	$(MAKE) --no-print-directory test-cluster || status=1; \
	exit $$status

# The unit tests, and the integration tests on a private Prosody.
test-prosody: install
	$(PYTEST) tests/ --ignore=tests/cluster

# The integration tests that use the session's XMPP service, again with it on a two-node ejabberd
# cluster on loopback (actors spread over both nodes); the others start a server of their own, or
# none, and run in `test-prosody` only (tests/conftest.py leaves them out here).
test-ejabberd: install
	VERTEBRA_TEST_ENGINE=ejabberd $(PYTEST) tests/integration

# Broker instances on three simulated hosts (network namespaces), each with an ejabberd node and an etcd
# member: the leader's host is partitioned mid-workflow, healed, and an etcd member killed. Needs root
# (or CAP_NET_ADMIN and CAP_SYS_ADMIN); skipped, saying so, where namespaces are not permitted.
test-cluster: install
	$(PYTHON) -m pytest -q tests/cluster

run: install
	$(VENV)/bin/vertebra up

# Every benchmark, then one table of every target (bench/run.py; also bench/results/summary.json).
bench: install
	$(PYTHON) bench/run.py

# The demo's storage agent (run as root) keeps its clones mounted after it stops: unmounted first, so that
# rm never reaches through a mount.
clean:
	-[ ! -x $(PYTHON) ] || [ ! -d .vertebra ] || $(PYTHON) -c 'import pathlib, agents.storage.overlay as o; o.unmount_all_under(pathlib.Path(".vertebra").resolve())'
	rm -rf $(VENV) .vertebra
