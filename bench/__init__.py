"""Throughput benchmark of the metering sidecar against a bare aiohttp ceiling and a
naive Postgres design. Not a test: it prints figures and ratios. See bench/README.md.

Run it with `python -m bench`.
"""
