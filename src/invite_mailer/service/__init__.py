"""The long-running processes: the daemon, its web endpoint and the health check."""
