"""What a portal handler knows about its caller: the session, as the credential the
billing and credits doors check (role `admin`, or `viewer`, which no write accepts),
and the doors themselves, taken from the billing application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from api.auth import require_admin
from billing.actions import BillingActions
from billing.appkeys import ACTIONS, BILLING_CONFIG, CATALOG, HOT, LEDGER, PORTAL_SESSIONS, STORE
from billing.catalog import Catalog
from billing.config import BillingConfig
from billing.portal_sessions import PortalSessions, Session
from billing.store import BillingStore
from hotpath.client import HotPath
from ledger.store import Credential, Ledger, LedgerReads

COOKIE = "credits_portal"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION = web.RequestKey("portal_session", Session)


@dataclass(frozen=True)
class Portal:
    """One request's view of the portal: who, and the doors."""

    request: web.Request
    session: Session

    @classmethod
    def of(cls, request: web.Request) -> Portal:
        return cls(request, request[SESSION])

    @property
    def org(self) -> str:
        return self.session.organization_id

    @property
    def cred(self) -> Credential:
        """The session as a credential: the same role checks as the API's."""
        return Credential(
            id=f"portal:{self.session.id}",
            organization_id=self.session.organization_id,
            role="admin" if self.session.role == "admin" else "viewer",
            department_id=None,
        )

    @property
    def is_admin(self) -> bool:
        return self.session.role == "admin"

    def require_admin(self) -> Credential:
        cred = self.cred
        require_admin(cred)  # ApiError 403, shown as a page
        return cred

    @property
    def ledger(self) -> Ledger:
        return self.request.config_dict[LEDGER]

    @property
    def reads(self) -> LedgerReads:
        return LedgerReads(self.ledger)

    @property
    def hot(self) -> HotPath:
        return self.request.config_dict[HOT]

    @property
    def actions(self) -> BillingActions:
        return self.request.config_dict[ACTIONS]

    @property
    def store(self) -> BillingStore:
        return self.request.config_dict[STORE]

    @property
    def catalog(self) -> Catalog:
        return self.request.config_dict[CATALOG]

    @property
    def billing(self) -> BillingConfig:
        return self.request.config_dict[BILLING_CONFIG]

    @property
    def sessions(self) -> PortalSessions:
        return self.request.config_dict[PORTAL_SESSIONS]
