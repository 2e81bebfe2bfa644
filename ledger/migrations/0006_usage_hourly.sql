-- Usage per hour, action and department, kept by settlement in the same transaction as
-- the usage events themselves (rollup_staged_uses, called right after settle_staged).
-- /usage/summary reads these rows for the whole hours of its range and the raw events
-- only for the partial hours at its edges, so a month of a busy organization's usage
-- is a few thousand rows to add up, not millions.

CREATE TABLE usage_hourly (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  hour timestamptz NOT NULL,                            -- date_trunc('hour', created_at, 'UTC')
  action text NOT NULL,
  department_id uuid,
  events bigint NOT NULL CHECK (events > 0),
  units bigint NOT NULL,
  credits bigint NOT NULL,
  CONSTRAINT usage_hourly_key UNIQUE NULLS NOT DISTINCT (organization_id, hour, action, department_id)
);

-- What was settled before this migration. The owner reads every organization's events
-- (FORCE is lifted for the statement, inside this migration's transaction).
ALTER TABLE usage_events NO FORCE ROW LEVEL SECURITY;
INSERT INTO usage_hourly (organization_id, hour, action, department_id, events, units, credits)
SELECT organization_id, date_trunc('hour', created_at, 'UTC'), action, department_id, count(*), sum(units), sum(credits)
  FROM usage_events
 GROUP BY 1, 2, 3, 4;
ALTER TABLE usage_events FORCE ROW LEVEL SECURITY;

ALTER TABLE usage_hourly ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_hourly FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON usage_hourly USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
CREATE POLICY settler ON usage_hourly TO credits_settler USING (true) WITH CHECK (true);
GRANT SELECT ON usage_hourly TO credits_app;
GRANT SELECT, INSERT, UPDATE ON usage_hourly TO credits_settler;

-- Add the staged usage events (settle_uses, see 0005) to their hours. Only called after
-- settle_staged succeeded in the same transaction, which inserted every one of them as
-- new (a batch with settled events is refused and staged again without them), so each
-- event is counted here exactly once too.
CREATE FUNCTION rollup_staged_uses() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO usage_hourly AS h (organization_id, hour, action, department_id, events, units, credits)
  SELECT u.org, date_trunc('hour', u.created_at, 'UTC'), u.action, u.department_id, count(*), sum(u.units),
         sum(u.amount)
    FROM settle_uses u
   GROUP BY 1, 2, 3, 4
  ON CONFLICT ON CONSTRAINT usage_hourly_key DO UPDATE
    SET events = h.events + excluded.events, units = h.units + excluded.units, credits = h.credits + excluded.credits;
END $$;
GRANT EXECUTE ON FUNCTION rollup_staged_uses() TO credits_settler;
