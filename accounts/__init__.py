"""Changing an organization's account: its keys, grants and adjustments, always the
ledger first (authoritative, survives Redis being down), then the cache.

- `accounts.grants`: the grant push (outbox): a grant the ledger holds reaches the
  cache exactly once, whoever pushes it (billing, the settler's outbox job, ops).
- `accounts.admin`: the verbs operators and the web pages use: create an organization
  or a key, revoke a key, grant, adjust, read both balances.

Above the hot path and the ledger, below every service, so the CLI, billing, the
settler and the web pages change money through the same code.
"""
