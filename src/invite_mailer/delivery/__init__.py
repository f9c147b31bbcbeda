"""Dispatching passes, transports, the SMTP pool, the rate limit and the ledger."""
