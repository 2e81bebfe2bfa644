-- Settlement: the usage streams into the ledger, exactly once.
--
-- The settler is a system component that settles every organization's events, so it
-- connects as its own role, credits_settler: not owner, not superuser, not BYPASSRLS.
-- Row-level security still applies to it; an explicit `settler` policy on the tables
-- it settles lets it see every organization there, and nowhere else. The services
-- that answer tenants keep using credits_app, confined to one organization.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credits_settler') THEN
    CREATE ROLE credits_settler LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
  END IF;
EXCEPTION WHEN duplicate_object THEN
  NULL;
END $$;

-- Where each hold's credits came from, so a release can return them to their grants.
CREATE TABLE reservation_allocations (
  organization_id uuid NOT NULL,
  reservation_id text NOT NULL,
  grant_id uuid NOT NULL REFERENCES credit_grants(id),
  amount bigint NOT NULL CHECK (amount > 0),
  score double precision NOT NULL,                        -- burn-down order in the cache
  PRIMARY KEY (organization_id, reservation_id, grant_id),
  FOREIGN KEY (organization_id, reservation_id) REFERENCES reservations(organization_id, id)
);
ALTER TABLE reservation_allocations ENABLE ROW LEVEL SECURITY;
ALTER TABLE reservation_allocations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON reservation_allocations USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());

ALTER TABLE reservations ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
CREATE INDEX reservations_open ON reservations (expires_at) WHERE status = 'open';
CREATE INDEX credit_grants_expiring ON credit_grants (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;
CREATE INDEX usage_events_org_action_time ON usage_events (organization_id, action, created_at DESC, id DESC);
CREATE INDEX usage_events_org_dept_time ON usage_events (organization_id, department_id, created_at DESC, id DESC)
  WHERE department_id IS NOT NULL;
CREATE INDEX ledger_entries_org_type_id ON ledger_entries (organization_id, type, id DESC);

-- Which ledger entries the settlement created, per stream entry range (ops insight).
CREATE TABLE settlement_batches (
  id text PRIMARY KEY,
  partition integer NOT NULL,
  first_entry text NOT NULL,
  last_entry text NOT NULL,
  events integer NOT NULL,
  settled_at timestamptz NOT NULL DEFAULT now()
);

-- Per partition, the last stream entry whose effects the ledger holds. Settlement is
-- ordered within a partition, so the ledger reflects exactly the entries up to here:
-- reconciliation compares the cache with the ledger plus the entries after it.
CREATE TABLE settlement_watermarks (
  partition integer PRIMARY KEY,
  last_ms bigint NOT NULL,
  last_seq bigint NOT NULL
);

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['organizations', 'usage_events', 'reservations', 'reservation_allocations',
                           'credit_grants', 'ledger_entries', 'grant_outbox', 'api_keys', 'departments',
                           'action_costs']
  LOOP
    EXECUTE format('CREATE POLICY settler ON %I TO credits_settler USING (true) WITH CHECK (true)', t);
  END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE ON usage_events, reservations, reservation_allocations, credit_grants,
  ledger_entries, organizations, settlement_batches, settlement_watermarks TO credits_settler;
GRANT SELECT, DELETE, UPDATE ON grant_outbox TO credits_settler;
GRANT SELECT ON api_keys, departments, action_costs TO credits_settler;
GRANT SELECT, INSERT, UPDATE, DELETE ON reservation_allocations TO credits_app;
GRANT SELECT ON settlement_watermarks TO credits_app;
GRANT EXECUTE ON FUNCTION current_org() TO credits_settler;

-- Settle one batch, staged by the settler (ledger/settle.py) into two temporary tables
-- of its session: settle_events (one row per event, deduplicated) and settle_allocs
-- (the grant allocations of each event). All or nothing; idempotent: events already
-- settled are skipped by their ids, so a batch delivered twice counts once.
-- Effects: usage events inserted, reservations opened and closed, grant remainders
-- moved, one `usage` ledger entry per organization per batch, one entry per capture,
-- expiration, adjustment and refund, and one balance update per organization.
CREATE FUNCTION settle_staged(p_batch text)
RETURNS TABLE (organization_id uuid, balance bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_orgs integer;
  v_locked integer;
  v_new_uses bigint;
  v_staged_uses bigint;
BEGIN
  -- Lock the organizations in a fixed order; grant_credits locks the same rows. Every
  -- organization of the batch must exist (usage_events has no foreign key).
  SELECT count(DISTINCT e.org) INTO v_orgs FROM settle_events e;
  WITH locked AS (
    SELECT o.id FROM organizations o
     WHERE o.id IN (SELECT DISTINCT e.org FROM settle_events e) ORDER BY o.id FOR UPDATE
  )
  SELECT count(*) INTO v_locked FROM locked;
  IF v_locked <> v_orgs THEN
    RAISE EXCEPTION 'settlement batch names % unknown organization(s)', v_orgs - v_locked
      USING ERRCODE = 'foreign_key_violation';
  END IF;

  TRUNCATE settle_new;

  -- Usage events: inserted idempotently by id; only the new ones count below.
  WITH ins AS (
    INSERT INTO usage_events AS u (organization_id, id, action, units, credits, department_id,
                                   credential_id, metadata, created_at)
    SELECT e.org, e.id, e.action, e.units, e.amount, e.department_id, e.credential_id,
           e.metadata, e.created_at
      FROM settle_events e WHERE e.kind = 'use'
    ON CONFLICT DO NOTHING
    RETURNING u.organization_id, u.id, u.credits
  )
  INSERT INTO settle_new (seq, org, kind, id, amount)
  SELECT 0, ins.organization_id, 'use', ins.id, -ins.credits FROM ins;
  GET DIAGNOSTICS v_new_uses = ROW_COUNT;
  SELECT count(*) INTO v_staged_uses FROM settle_events e WHERE e.kind = 'use';

  WITH ins AS (
    INSERT INTO reservations AS r (organization_id, id, amount, status, department_id,
                                   credential_id, action, expires_at, created_at, metadata)
    SELECT e.org, e.id, e.amount, 'open', e.department_id, e.credential_id, e.action,
           e.expires_at, e.created_at, e.metadata
      FROM settle_events e WHERE e.kind = 'hold'
    ON CONFLICT DO NOTHING
    RETURNING r.organization_id, r.id
  )
  INSERT INTO settle_new (seq, org, kind, id, amount)
  SELECT e.seq, e.org, 'hold', e.id, 0
    FROM ins JOIN settle_events e ON e.kind = 'hold' AND e.org = ins.organization_id AND e.id = ins.id;

  INSERT INTO reservation_allocations (organization_id, reservation_id, grant_id, amount, score)
  SELECT a.org, a.event_id, a.grant_id, sum(a.amount), max(a.score)
    FROM settle_allocs a JOIN settle_new n ON n.kind = 'hold' AND n.org = a.org AND n.id = a.event_id
   WHERE a.kind = 'hold'
   GROUP BY a.org, a.event_id, a.grant_id;

  WITH upd AS (
    UPDATE reservations r
       SET status = e.how, used = e.amount, closed_at = e.created_at
      FROM settle_events e
     WHERE e.kind = 'close' AND r.organization_id = e.org AND r.id = e.reservation_id
       AND r.status = 'open'
    RETURNING r.organization_id, r.id, e.seq, e.id AS event_id, r.used
  )
  INSERT INTO settle_new (seq, org, kind, id, amount, reservation_id)
  SELECT upd.seq, upd.organization_id, 'close', upd.event_id, -upd.used, upd.id FROM upd;

  -- Expirations, adjustments and refunds are ledger entries keyed by their event id.
  INSERT INTO settle_new (seq, org, kind, id, amount, reason, grant_id)
  SELECT e.seq, e.org, e.kind, e.id, -e.amount, e.reason, e.grant_id
    FROM settle_events e
   WHERE e.kind IN ('expiration', 'adjustment', 'refund')
     AND NOT EXISTS (SELECT 1 FROM ledger_entries l
                      WHERE l.organization_id = e.org AND l.type = e.kind AND l.reference = e.id);

  -- Grant remainders: debited by usage, holds, adjustments, refunds and expirations;
  -- a closed hold gives back what it held but did not capture.
  UPDATE credit_grants g SET remaining = g.remaining + d.delta
    FROM (
      SELECT x.grant_id, sum(x.delta) AS delta FROM (
        -- usage: every staged event was new (the usual case), or only the new ones
        SELECT a.grant_id, -a.amount AS delta
          FROM settle_allocs a WHERE a.kind = 'use' AND v_new_uses = v_staged_uses
        UNION ALL
        SELECT a.grant_id, -a.amount AS delta
          FROM settle_allocs a
          JOIN settle_new n ON n.org = a.org AND n.id = a.event_id AND n.kind = 'use'
         WHERE a.kind = 'use' AND v_new_uses <> v_staged_uses
        UNION ALL
        SELECT a.grant_id, -a.amount AS delta
          FROM settle_allocs a
          JOIN settle_new n ON n.org = a.org AND n.id = a.event_id AND n.kind = a.kind
         WHERE a.kind IN ('hold', 'adjustment', 'refund')
        UNION ALL
        SELECT ra.grant_id, ra.amount
          FROM settle_new n
          JOIN reservation_allocations ra ON ra.organization_id = n.org AND ra.reservation_id = n.reservation_id
         WHERE n.kind = 'close'
        UNION ALL
        SELECT a.grant_id, -a.amount
          FROM settle_allocs a
          JOIN settle_new n ON n.org = a.org AND n.id = a.event_id AND n.kind = 'close'
         WHERE a.kind = 'capture'
        UNION ALL
        SELECT n.grant_id, n.amount FROM settle_new n WHERE n.kind = 'expiration'
      ) x GROUP BY x.grant_id
    ) d
   WHERE g.id = d.grant_id AND d.delta <> 0;

  -- Ledger entries with running balances, then one balance update per organization.
  WITH entries AS (
    SELECT n.org, 'usage'::text AS type, sum(n.amount) AS amount, max(n.seq) AS seq,
           'usage:' || p_batch AS reference, ''::text AS reason, NULL::uuid AS grant_id
      FROM settle_new n WHERE n.kind = 'use' GROUP BY n.org HAVING sum(n.amount) <> 0
    UNION ALL
    SELECT n.org, 'reservation_capture', n.amount, n.seq, 'capture:' || n.reservation_id, '', NULL
      FROM settle_new n WHERE n.kind = 'close' AND n.amount <> 0
    UNION ALL
    SELECT n.org, n.kind, n.amount, n.seq, n.id, coalesce(n.reason, ''), n.grant_id
      FROM settle_new n WHERE n.kind IN ('expiration', 'adjustment', 'refund') AND n.amount <> 0
  ), numbered AS (
    SELECT e.*, o.balance + sum(e.amount) OVER (PARTITION BY e.org ORDER BY e.seq, e.reference
                                               ROWS UNBOUNDED PRECEDING) AS balance_after
      FROM entries e JOIN organizations o ON o.id = e.org
  ), ins AS (
    INSERT INTO ledger_entries (organization_id, type, amount, balance_after, grant_id, reference, reason)
    SELECT n.org, n.type, n.amount, n.balance_after, n.grant_id, n.reference, n.reason
      FROM numbered n ORDER BY n.org, n.seq, n.reference
    RETURNING ledger_entries.organization_id, ledger_entries.amount
  ), totals AS (
    SELECT ins.organization_id AS org, sum(ins.amount) AS delta FROM ins GROUP BY 1
  )
  UPDATE organizations o SET balance = o.balance + t.delta FROM totals t WHERE o.id = t.org;

  RETURN QUERY
    SELECT o.id, o.balance FROM organizations o
     WHERE o.id IN (SELECT DISTINCT e.org FROM settle_events e);
END $$;

GRANT EXECUTE ON FUNCTION settle_staged(text) TO credits_settler;
