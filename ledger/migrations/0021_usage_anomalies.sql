-- The usage audit (issue 11): spend per hour, per organization and per API key,
-- against its own recent baseline; a spike beyond a configurable factor is a finding
-- (settler/anomalies.py explains the method). The settler finds and records them
-- (credits_settler, its `settler` policy), an organization's members and the services
-- read their own (tenant), operators decide them (credits_app in the organization's
-- context, through the console or the CLI, audited) and the console reads them all.

-- The detector reads one hour of every organization's rollup.
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

CREATE TABLE usage_anomalies (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  scope text NOT NULL CHECK (scope IN ('organization', 'api_key')),
  credential_id text,                                   -- api_key: the key (usage_hourly.credential_id)
  hour timestamptz NOT NULL,                            -- the hour of spend, UTC
  spend bigint NOT NULL CHECK (spend >= 0),             -- millicredits in that hour (so far, for the current one)
  baseline bigint NOT NULL CHECK (baseline >= 0),       -- mean millicredits per hour before it
  baseline_hours integer NOT NULL CHECK (baseline_hours > 0),
  threshold_factor numeric NOT NULL CHECK (threshold_factor > 1),
  state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'acknowledged', 'dismissed')),
  decided_by text,
  decided_at timestamptz,
  note text NOT NULL DEFAULT '' CHECK (length(note) <= 500),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CHECK ((scope = 'api_key') = (credential_id IS NOT NULL)),
  UNIQUE NULLS NOT DISTINCT (organization_id, scope, credential_id, hour)
);
CREATE INDEX usage_anomalies_state ON usage_anomalies (state, created_at DESC);

ALTER TABLE usage_anomalies ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_anomalies FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON usage_anomalies USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
CREATE POLICY settler ON usage_anomalies TO credits_settler USING (true) WITH CHECK (true);
CREATE POLICY console ON usage_anomalies FOR SELECT TO credits_console USING (true);
GRANT SELECT, INSERT, UPDATE (spend, baseline, baseline_hours, updated_at) ON usage_anomalies TO credits_settler;
GRANT SELECT, UPDATE (state, decided_by, decided_at, note, updated_at) ON usage_anomalies TO credits_app;
GRANT SELECT ON usage_anomalies TO credits_console;
