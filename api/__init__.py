"""What every HTTP service of ours shares (the sidecar, billing, the web pages): the
one error shape and its middleware (`api.errors`), and who is calling (`api.auth`:
organization API keys and frontend JWTs). Above the hot path and the ledger, below the
services, so no service imports another."""
