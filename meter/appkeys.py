"""Typed application keys: every shared resource of the sidecar, declared once."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from api.auth import Authenticator
from core.config import Config
from hotpath.client import HotPath
from hotpath.group import ConsumeGroups
from ledger.store import Ledger
from meter.forecasts import SpendRates
from meter.sources import GrantSources

CONFIG = web.AppKey("config", Config)
REDIS = web.AppKey("redis", Redis)
LEDGER = web.AppKey("ledger", Ledger)
HOT = web.AppKey("hotpath", HotPath)
# What /use charges through: the group commit (CONSUME_COALESCE, the default) or HOT itself.
CONSUMER: web.AppKey[ConsumeGroups | HotPath] = web.AppKey("consumer")
AUTH = web.AppKey("auth", Authenticator)
SOURCES = web.AppKey("grant_sources", GrantSources)
SPEND_RATES = web.AppKey("spend_rates", SpendRates)
