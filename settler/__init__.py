"""Settlement: moving state between the Postgres ledger and the Redis cache."""
