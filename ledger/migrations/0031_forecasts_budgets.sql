-- Forecasts and budgets (issue 13): when credits run out at the recent rate of spend, a
-- low-balance alert as "N days left", and department budgets that alert instead of
-- refusing (soft).

-- Settled spend of an organization over the last p_window_s seconds, from the hourly
-- rollup settlement keeps (usage and reservation captures), and the start of the first
-- hour that had any: the rate is credits / (now - since). Runs as the caller (RLS).
CREATE FUNCTION recent_spend(p_org uuid, p_window_s integer)
RETURNS TABLE (credits bigint, since timestamptz)
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
  SELECT coalesce(sum(h.credits), 0)::bigint, min(h.hour)
    FROM usage_hourly h
   WHERE h.organization_id = p_org AND h.credits > 0
     AND h.hour >= date_trunc('hour', now() - make_interval(secs => p_window_s), 'UTC')
$$;
GRANT EXECUTE ON FUNCTION recent_spend(uuid, integer) TO credits_app, credits_settler;

-- "Alert me when fewer than N days are left" (at the recent rate), with or instead of
-- an amount (threshold 0 = the days only).
ALTER TABLE balance_alerts ADD COLUMN days_left numeric(6, 2) CHECK (days_left > 0 AND days_left <= 365);

-- A soft budget alerts at alert_percent of its limit and keeps charging; a hard one
-- (the default, as before) refuses the charge that would pass it.
ALTER TABLE departments
  ADD COLUMN budget_mode text NOT NULL DEFAULT 'hard' CHECK (budget_mode IN ('hard', 'soft')),
  ADD COLUMN alert_percent smallint CHECK (alert_percent BETWEEN 1 AND 100);

-- Each soft budget alerts once per period (the first settler to see the crossing).
CREATE TABLE department_budget_alerts (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  department_id uuid NOT NULL REFERENCES departments(id),
  period_start timestamptz NOT NULL,
  alert_percent smallint NOT NULL,
  spent bigint NOT NULL,
  budget bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (department_id, period_start)
);
ALTER TABLE department_budget_alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE department_budget_alerts FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON department_budget_alerts USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
CREATE POLICY settler ON department_budget_alerts TO credits_settler USING (true) WITH CHECK (true);
GRANT SELECT ON department_budget_alerts TO credits_app;
GRANT SELECT, INSERT ON department_budget_alerts TO credits_settler;
