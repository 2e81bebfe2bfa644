"""The settler's Prometheus metrics, in one registry (served at /metrics on SETTLER_PORT)."""

from __future__ import annotations

import prometheus_client

REGISTRY = prometheus_client.CollectorRegistry()
LAG_ENTRIES = prometheus_client.Gauge(
    "credits_settlement_lag_entries", "Unsettled stream entries", ["partition"], registry=REGISTRY
)
LAG_SECONDS = prometheus_client.Gauge(
    "credits_settlement_lag_seconds", "Age of the oldest unsettled entry", ["partition"], registry=REGISTRY
)
LAG_ALERTS = prometheus_client.Counter(
    "credits_settlement_lag_alerts", "Times settlement lag passed the alert threshold", registry=REGISTRY
)
DRIFT = prometheus_client.Gauge(
    "credits_reconciliation_drift_millicredits", "Total absolute drift, cache vs ledger", registry=REGISTRY
)
SETTLED = prometheus_client.Counter("credits_settled_events", "Events settled into the ledger", registry=REGISTRY)
QUARANTINED = prometheus_client.Counter(
    "credits_settlement_quarantined",
    "Stream entries settlement could not take, by state (cleaned: settled without the offending text;"
    " held: kept out of the ledger until ops replay or discard them)",
    ["state"],
    registry=REGISTRY,
)
