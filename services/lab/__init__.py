"""The lab: real components (nats-server, MariaDB, SoftHSM2) started on private ports and directories."""
