-- Automatic top-up (issue 13): when an organization's available credits fall below its
-- threshold, one package is bought with its default card, off-session, and granted
-- through the purchase path (exactly once per PaymentIntent, as any purchase).
--
-- Single flight: a top-up is started by the transaction that turns `armed` off (one
-- process wins it); `armed` comes back only once available is at or above the threshold
-- again and no attempt is open, after a cooldown. The attempt's number (trigger_seq)
-- makes the Stripe idempotency key, so a retry after a crash pays once. A failure
-- (declined, authentication required, a cap reached) pauses the organization's top-ups
-- until its settings are saved again.

CREATE TABLE auto_topup_settings (
  organization_id uuid PRIMARY KEY REFERENCES organizations(id),
  enabled boolean NOT NULL DEFAULT false,
  threshold bigint NOT NULL CHECK (threshold >= 0),             -- millicredits of `available`
  package_id text NOT NULL REFERENCES billing_credit_packages(id),
  max_per_month integer NOT NULL CHECK (max_per_month BETWEEN 1 AND 1000),
  monthly_cap_cents bigint NOT NULL CHECK (monthly_cap_cents >= 0),
  armed boolean NOT NULL DEFAULT true,
  triggers bigint NOT NULL DEFAULT 0,                          -- attempts started (trigger_seq of the last)
  paused_reason text CHECK (paused_reason IN ('card_declined', 'authentication_required', 'cap_reached',
                                              'no_payment_method', 'payment_failed')),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE auto_topup_attempts (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  trigger_seq bigint NOT NULL,
  package_id text NOT NULL REFERENCES billing_credit_packages(id),
  credits bigint NOT NULL CHECK (credits > 0),
  amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
  currency text NOT NULL,
  available_at_trigger bigint NOT NULL,
  status text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
  failure_reason text,
  payment_intent_id text,
  lease_until timestamptz NOT NULL DEFAULT now(),              -- who pays a pending attempt, until when
  created_at timestamptz NOT NULL DEFAULT now(),
  decided_at timestamptz,
  UNIQUE (organization_id, trigger_seq)
);
CREATE INDEX auto_topup_attempts_org ON auto_topup_attempts (organization_id, created_at DESC);
CREATE INDEX auto_topup_attempts_pending ON auto_topup_attempts (lease_until) WHERE status = 'pending';

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['auto_topup_settings', 'auto_topup_attempts'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
  END LOOP;
END $$;

-- The organizations a top-up runner looks at (enabled, not paused), and the pending
-- attempts whose lease ran out (a runner died mid-payment), ids only, a page at a time.
CREATE FUNCTION auto_topup_candidates(p_after uuid, p_limit integer)
RETURNS TABLE (organization_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT s.organization_id FROM auto_topup_settings s
   WHERE s.enabled AND s.paused_reason IS NULL AND (p_after IS NULL OR s.organization_id > p_after)
   ORDER BY s.organization_id
   LIMIT least(greatest(p_limit, 0), 1000)
$$;
CREATE FUNCTION auto_topup_stalled(p_limit integer)
RETURNS TABLE (organization_id uuid, id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT a.organization_id, a.id FROM auto_topup_attempts a
   WHERE a.status = 'pending' AND a.lease_until < now()
   ORDER BY a.lease_until
   LIMIT least(greatest(p_limit, 0), 1000)
$$;
REVOKE ALL ON FUNCTION auto_topup_candidates(uuid, integer), auto_topup_stalled(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auto_topup_candidates(uuid, integer), auto_topup_stalled(integer) TO credits_app;
GRANT SELECT, INSERT, UPDATE ON auto_topup_settings, auto_topup_attempts TO credits_app;
