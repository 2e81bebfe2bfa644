-- Low-balance alerts: a threshold and a webhook URL per organization, and an outbox
-- of signed outgoing deliveries (retried until the receiver answers 2xx).

CREATE TABLE balance_alerts (
  organization_id uuid PRIMARY KEY REFERENCES organizations(id),
  threshold bigint NOT NULL CHECK (threshold >= 0),          -- millicredits of `available`
  webhook_url text NOT NULL CHECK (webhook_url ~ '^https?://'),
  secret text NOT NULL,                                       -- HMAC-SHA256 key for signatures
  state text NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'low')),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  event_type text NOT NULL,
  payload jsonb NOT NULL,
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  delivered_at timestamptz,
  last_error text NOT NULL DEFAULT '',
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE delivered_at IS NULL;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['balance_alerts', 'webhook_deliveries'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
    EXECUTE format('CREATE POLICY settler ON %I TO credits_settler USING (true) WITH CHECK (true)', t);
  END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON balance_alerts, webhook_deliveries TO credits_app;
GRANT SELECT, INSERT, UPDATE ON balance_alerts, webhook_deliveries TO credits_settler;
