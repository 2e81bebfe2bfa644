-- Adjustments down (and grant voids) are decided once in Postgres (issue 8, item 9).
-- Their idempotency by reference lived only in a 48 h Redis key: a repeat two days
-- later debited again. Now a reference is unique per organization here, written before
-- the hot path debits, and the debit's event id comes from the row (so the ledger entry
-- it settles into is found by it too: ledger_entries.reference = event_id).
CREATE TABLE credit_adjustments (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  reference text NOT NULL CHECK (length(reference) BETWEEN 1 AND 255),
  kind text NOT NULL CHECK (kind IN ('debit', 'void')),
  amount bigint NOT NULL CHECK (amount > 0),            -- asked, millicredits
  grant_id uuid REFERENCES credit_grants(id),           -- void: the grant whose unspent part goes
  reason text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
  actor text NOT NULL DEFAULT '',                       -- who asked (an operator, a system user)
  event_id text NOT NULL,                               -- the debit's stream event
  outcome text NOT NULL DEFAULT 'pending' CHECK (outcome IN ('pending', 'applied', 'refused')),
  debited bigint CHECK (debited >= 0),                  -- what it took, once applied
  created_at timestamptz NOT NULL DEFAULT now(),
  decided_at timestamptz,
  UNIQUE (organization_id, reference),
  CHECK ((kind = 'void') = (grant_id IS NOT NULL))
);

-- A decision is final: pending may become applied or refused (a refusal may be tried
-- again, and then applied), an applied one never changes, and nothing is deleted.
CREATE FUNCTION guard_adjustment_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.outcome = 'applied' THEN
    RAISE EXCEPTION 'credit_adjustments: % is applied; it never changes', OLD.id USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF (NEW.id, NEW.organization_id, NEW.reference, NEW.kind, NEW.amount, NEW.grant_id, NEW.reason, NEW.event_id,
      NEW.created_at)
     IS DISTINCT FROM (OLD.id, OLD.organization_id, OLD.reference, OLD.kind, OLD.amount, OLD.grant_id, OLD.reason,
      OLD.event_id, OLD.created_at) THEN
    RAISE EXCEPTION 'credit_adjustments: only its outcome changes' USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER credit_adjustments_decide_once BEFORE UPDATE ON credit_adjustments
  FOR EACH ROW EXECUTE FUNCTION guard_adjustment_change();
CREATE TRIGGER credit_adjustments_append_only BEFORE DELETE ON credit_adjustments
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();

ALTER TABLE credit_adjustments ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_adjustments FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON credit_adjustments USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
CREATE POLICY settler ON credit_adjustments TO credits_settler USING (true);
GRANT SELECT, INSERT ON credit_adjustments TO credits_app;
GRANT UPDATE (outcome, debited, decided_at) ON credit_adjustments TO credits_app;
GRANT SELECT ON credit_adjustments TO credits_settler;
