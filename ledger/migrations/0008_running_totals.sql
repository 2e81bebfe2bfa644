-- Running totals that make a cold-cache load exact and bounded (issue 8, items 7 and 8).
-- A load used to sum every usage event of each API key (no index on the credential),
-- pull every department event of the period into Python, and leave out what closed
-- reservations captured, so key caps and department limits opened up after a reload.
-- Settlement keeps two totals in the same transaction as the events themselves
-- (rollup_staged_spend, called after settle_staged):
--   credential_spend        per API key: what it spent in all (usage + captures), and
--                           when it was last used;
--   department_spend_daily  per department and UTC day: usage by the event's day,
--                           captures by the day their reservation was made (a hold's
--                           charge belongs to the period it was taken in, as in the
--                           scripts). A period (day, ISO week, month) is a run of days.
-- What a load adds to them: the open holds (the ledger's) and the unsettled events
-- (the stream's, replayed).

CREATE TABLE credential_spend (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  credential_id text NOT NULL,
  spent bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
  last_used_at timestamptz,
  PRIMARY KEY (organization_id, credential_id)
);

CREATE TABLE department_spend_daily (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  department_id uuid NOT NULL,
  day date NOT NULL,
  spent bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
  PRIMARY KEY (organization_id, department_id, day)
);

-- Grants a load marks as applied: the recent ones (see hotpath's APPLIED_KEEP_MS).
CREATE INDEX credit_grants_org_created ON credit_grants (organization_id, created_at);

-- What was settled before this migration (the owner reads every organization's rows:
-- FORCE is lifted for these statements, inside this migration's transaction).
ALTER TABLE usage_events NO FORCE ROW LEVEL SECURITY;
ALTER TABLE reservations NO FORCE ROW LEVEL SECURITY;
INSERT INTO credential_spend (organization_id, credential_id, spent, last_used_at)
SELECT organization_id, credential_id, sum(amount), max(at) FROM (
  SELECT organization_id, credential_id, credits AS amount, created_at AS at FROM usage_events
  UNION ALL
  SELECT organization_id, credential_id, used, closed_at FROM reservations WHERE status <> 'open' AND used > 0
) x GROUP BY 1, 2;
INSERT INTO department_spend_daily (organization_id, department_id, day, spent)
SELECT organization_id, department_id, day, sum(amount) FROM (
  SELECT organization_id, department_id, (created_at AT TIME ZONE 'UTC')::date AS day, credits AS amount
    FROM usage_events WHERE department_id IS NOT NULL
  UNION ALL
  SELECT organization_id, department_id, (created_at AT TIME ZONE 'UTC')::date, used
    FROM reservations WHERE status <> 'open' AND used > 0 AND department_id IS NOT NULL
) x GROUP BY 1, 2, 3;
ALTER TABLE usage_events FORCE ROW LEVEL SECURITY;
ALTER TABLE reservations FORCE ROW LEVEL SECURITY;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['credential_spend', 'department_spend_daily'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
    EXECUTE format('CREATE POLICY settler ON %I TO credits_settler USING (true) WITH CHECK (true)', t);
  END LOOP;
END $$;
GRANT SELECT ON credential_spend, department_spend_daily TO credits_app;
GRANT SELECT, INSERT, UPDATE ON credential_spend, department_spend_daily TO credits_settler;

-- Add this batch's spending to the totals. Called right after settle_staged in the same
-- transaction: settle_uses holds exactly the usage events inserted as new (a batch
-- with settled events is staged again without them), and settle_new's `close` rows
-- exactly the reservations this batch closed, so everything is counted once.
CREATE FUNCTION rollup_staged_spend() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO credential_spend AS c (organization_id, credential_id, spent, last_used_at)
  SELECT x.org, x.cred, sum(x.amount), max(x.at) FROM (
    SELECT u.org, u.credential_id AS cred, u.amount, u.created_at AS at FROM settle_uses u
    UNION ALL
    SELECT n.org, r.credential_id, -n.amount, r.closed_at
      FROM settle_new n JOIN reservations r ON r.organization_id = n.org AND r.id = n.reservation_id
     WHERE n.kind = 'close'
  ) x
  GROUP BY 1, 2
  ON CONFLICT (organization_id, credential_id) DO UPDATE
    SET spent = c.spent + excluded.spent,
        last_used_at = greatest(c.last_used_at, excluded.last_used_at);

  INSERT INTO department_spend_daily AS d (organization_id, department_id, day, spent)
  SELECT x.org, x.dept, x.day, sum(x.amount) FROM (
    SELECT u.org, u.department_id AS dept, (u.created_at AT TIME ZONE 'UTC')::date AS day, u.amount
      FROM settle_uses u WHERE u.department_id IS NOT NULL
    UNION ALL
    SELECT n.org, r.department_id, (r.created_at AT TIME ZONE 'UTC')::date, -n.amount
      FROM settle_new n JOIN reservations r ON r.organization_id = n.org AND r.id = n.reservation_id
     WHERE n.kind = 'close' AND r.department_id IS NOT NULL
  ) x
  WHERE x.amount <> 0
  GROUP BY 1, 2, 3
  ON CONFLICT (organization_id, department_id, day) DO UPDATE SET spent = d.spent + excluded.spent;
END $$;
GRANT EXECUTE ON FUNCTION rollup_staged_spend() TO credits_settler;
