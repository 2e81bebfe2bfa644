"""Typed application keys: every shared resource of the billing service, declared once."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from api.auth import Authenticator
from billing.actions import BillingActions
from billing.autotopup import AutoTopups
from billing.catalog import Catalog
from billing.config import BillingConfig
from billing.credits import Credits
from billing.gateway import StripeGateway
from billing.portal_sessions import PortalSessions
from billing.store import BillingStore
from core.config import Config
from hotpath.client import HotPath
from ledger.store import Ledger
from webhooks.endpoint import WebhookReceiver
from webhooks.store import EventStore
from webhooks.worker import EventWorker

CONFIG = web.AppKey("config", Config)
BILLING_CONFIG = web.AppKey("billing_config", BillingConfig)
REDIS = web.AppKey("redis", Redis)
LEDGER = web.AppKey("ledger", Ledger)
HOT = web.AppKey("hotpath", HotPath)
AUTH = web.AppKey("auth", Authenticator)
GATEWAY: web.AppKey[StripeGateway] = web.AppKey("gateway")
CATALOG = web.AppKey("catalog", Catalog)
STORE = web.AppKey("billing_store", BillingStore)
CREDITS = web.AppKey("credits", Credits)
ACTIONS = web.AppKey("actions", BillingActions)
EVENTS = web.AppKey("events", EventStore)
WORKER = web.AppKey("worker", EventWorker)
RECEIVER = web.AppKey("webhook_receiver", WebhookReceiver)
PORTAL_SESSIONS = web.AppKey("portal_sessions", PortalSessions)
AUTO_TOPUPS = web.AppKey("auto_topups", AutoTopups)
