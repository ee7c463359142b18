"""Storage: the driver contract (driver.py), its drivers (embedded.py, the default chunk store; btrfs.py),
name rules (names.py) and the replication stream format (stream.py) that the storage agent stands on."""
