"""The authoritative Postgres ledger: schema migrations and the typed store."""
