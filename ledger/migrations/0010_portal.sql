-- What the customer portal reads (portal/), and the rules it shares with the API.
--
-- 1. Reservation captures are usage. A released reservation that charged `used > 0`
--    is listed by /api/credits/usage next to the usage events (id = the reservation
--    id, units 1, credits = used, created_at = when it was released) and added up by
--    /usage/summary. The partial indexes below page captures in order exactly as
--    usage_events_org_time and its siblings page usage events, so a page stays two
--    index scans merged in order.
-- 2. The hourly rollup is kept per credential too (the portal's usage per API key),
--    and holds the captures: rebuilt here from the events and the reservations, then
--    kept by settlement (rollup_staged_uses and rollup_staged_captures, called in the
--    settling transaction by ledger/settlement.py).
-- 3. Portal links and sessions (billing/portal_sessions.py): a link is single use and
--    short-lived; a session is a server-side record the cookie names by a secret's
--    hash, so it can be revoked. Both the link and the cookie name their organization
--    (the link signed), and each row is looked up inside that organization under
--    row-level security: a link or cookie edited to name another organization finds
--    nothing there.

CREATE INDEX reservations_captured ON reservations (organization_id, closed_at DESC, id DESC)
  WHERE used > 0;
CREATE INDEX reservations_captured_action ON reservations (organization_id, action, closed_at DESC, id DESC)
  WHERE used > 0;
CREATE INDEX reservations_captured_dept ON reservations (organization_id, department_id, closed_at DESC, id DESC)
  WHERE used > 0 AND department_id IS NOT NULL;

-- The rollup, rebuilt with a credential column and the captures. The owner reads and
-- writes every organization's rows (FORCE is lifted for these statements, inside this
-- migration's transaction, as 0006 did).
TRUNCATE usage_hourly;
ALTER TABLE usage_hourly DROP CONSTRAINT usage_hourly_key;
ALTER TABLE usage_hourly ADD COLUMN credential_id text NOT NULL;
ALTER TABLE usage_hourly ADD CONSTRAINT usage_hourly_key
  UNIQUE NULLS NOT DISTINCT (organization_id, hour, action, department_id, credential_id);

ALTER TABLE usage_events NO FORCE ROW LEVEL SECURITY;
ALTER TABLE reservations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE usage_hourly NO FORCE ROW LEVEL SECURITY;
INSERT INTO usage_hourly AS h (organization_id, hour, action, department_id, credential_id, events, units, credits)
SELECT x.organization_id, x.hour, x.action, x.department_id, x.credential_id, sum(x.events), sum(x.units),
       sum(x.credits)
  FROM (
    SELECT organization_id, date_trunc('hour', created_at, 'UTC') AS hour, action, department_id, credential_id,
           count(*) AS events, sum(units) AS units, sum(credits) AS credits
      FROM usage_events GROUP BY 1, 2, 3, 4, 5
    UNION ALL
    SELECT organization_id, date_trunc('hour', closed_at, 'UTC'), action, department_id, credential_id,
           count(*), count(*), sum(used)
      FROM reservations WHERE used > 0 GROUP BY 1, 2, 3, 4, 5
  ) x
 GROUP BY 1, 2, 3, 4, 5;
ALTER TABLE usage_events FORCE ROW LEVEL SECURITY;
ALTER TABLE reservations FORCE ROW LEVEL SECURITY;
ALTER TABLE usage_hourly FORCE ROW LEVEL SECURITY;

-- The staged usage events of a batch, by hour, action, department and credential (see
-- 0006 for why each is counted exactly once).
CREATE OR REPLACE FUNCTION rollup_staged_uses() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO usage_hourly AS h (organization_id, hour, action, department_id, credential_id, events, units, credits)
  SELECT u.org, date_trunc('hour', u.created_at, 'UTC'), u.action, u.department_id, u.credential_id, count(*),
         sum(u.units), sum(u.amount)
    FROM settle_uses u
   GROUP BY 1, 2, 3, 4, 5
  ON CONFLICT ON CONSTRAINT usage_hourly_key DO UPDATE
    SET events = h.events + excluded.events, units = h.units + excluded.units, credits = h.credits + excluded.credits;
END $$;

-- The captures this batch settled: settle_staged() put one `close` row in settle_new
-- for each reservation it closed now (a reservation already closed is not there), so
-- each capture is counted once. Called right after settle_staged, in its transaction.
CREATE FUNCTION rollup_staged_captures() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO usage_hourly AS h (organization_id, hour, action, department_id, credential_id, events, units, credits)
  SELECT r.organization_id, date_trunc('hour', r.closed_at, 'UTC'), r.action, r.department_id, r.credential_id,
         count(*), count(*), sum(r.used)
    FROM settle_new n
    JOIN reservations r ON r.organization_id = n.org AND r.id = n.reservation_id
   WHERE n.kind = 'close' AND r.used > 0
   GROUP BY 1, 2, 3, 4, 5
  ON CONFLICT ON CONSTRAINT usage_hourly_key DO UPDATE
    SET events = h.events + excluded.events, units = h.units + excluded.units, credits = h.credits + excluded.credits;
END $$;
GRANT EXECUTE ON FUNCTION rollup_staged_captures() TO credits_settler;

-- Portal links: single use, at most an hour (billing/portal_sessions.py signs them;
-- the row makes the single use and the binding to one organization hold).
CREATE TABLE portal_links (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  role text NOT NULL CHECK (role IN ('admin', 'viewer')),
  return_url text CHECK (length(return_url) <= 2048),
  created_by text NOT NULL,                             -- the credential that asked for it
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  used_at timestamptz,
  revoked_at timestamptz,
  CHECK (expires_at <= created_at + interval '1 hour')
);

-- Browser sessions started from a link. The cookie carries a secret; only its sha256
-- is stored. Revoking the link (or signing out) revokes its sessions.
CREATE TABLE portal_sessions (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  link_id uuid NOT NULL REFERENCES portal_links(id),
  secret_hash bytea NOT NULL UNIQUE,
  role text NOT NULL CHECK (role IN ('admin', 'viewer')),
  return_url text,
  csrf_token text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  revoked_at timestamptz
);
CREATE INDEX portal_sessions_link ON portal_sessions (organization_id, link_id);

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['portal_links', 'portal_sessions']
  LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
  END LOOP;
END $$;
GRANT SELECT, INSERT, UPDATE ON portal_links, portal_sessions TO credits_app;
