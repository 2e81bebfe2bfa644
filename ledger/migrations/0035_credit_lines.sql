-- Credit lines (issue 13): a trusted organization may spend past its grants, down to
-- minus its credit limit. What it owes is a ledger state of its own:
--   organizations.credit_limit  how far below zero `available` may go (0: none, the
--                               default); set by operations only (credits credit-line set)
--   organizations.debt          what usage charged past the grants, less what grants
--                               repaid (the next grants repay it first)
--   debt_entries                every change of the debt, append-only, with debt_after
--   credit_line_changes         who set which limit when, and why
-- The balance keeps its meaning (grants remaining + open holds - debt), so it goes
-- below zero while the organization owes; every ledger entry still moves it.
--
-- The hot path decides each split, as it decides every grant allocation: a charge past
-- the grants carries `od` (the part that became debt) and a grant push `rp` (the debt it
-- repaid first). Settlement records them (settle_staged_debt, after settle_staged, in
-- the same transaction), each once: an overdraw is keyed by its usage event, a
-- repayment by its grant.

ALTER TABLE organizations
  ADD COLUMN credit_limit bigint NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
  ADD COLUMN debt bigint NOT NULL DEFAULT 0;

CREATE TABLE debt_entries (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  type text NOT NULL CHECK (type IN ('overdraw', 'repayment', 'hold_return')),
  amount bigint NOT NULL,                               -- signed change of the debt
  debt_after bigint NOT NULL,
  grant_id uuid REFERENCES credit_grants(id),           -- the grant that repaid
  reference text NOT NULL,                              -- 'usage:'||batch | 'hold:'||id | grant id | 'close:'||event
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, type, reference)
);
CREATE INDEX debt_entries_org_id ON debt_entries (organization_id, id DESC);

CREATE TABLE credit_line_changes (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  credit_limit bigint NOT NULL CHECK (credit_limit >= 0),
  reason text NOT NULL DEFAULT '',
  created_at timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['debt_entries', 'credit_line_changes'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
    EXECUTE format('CREATE POLICY settler ON %I TO credits_settler USING (true) WITH CHECK (true)', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change()',
                   t || '_append_only', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change()',
                   t || '_no_truncate', t);
  END LOOP;
END $$;
GRANT SELECT, INSERT ON credit_line_changes TO credits_app;
GRANT SELECT ON debt_entries TO credits_app;
GRANT SELECT, INSERT ON debt_entries TO credits_settler;

-- Set an organization's credit limit (operations only: the CLI), with its reason.
CREATE FUNCTION set_credit_limit(p_org uuid, p_limit bigint, p_reason text)
RETURNS TABLE (credit_limit bigint, debt bigint)
LANGUAGE plpgsql AS $$
BEGIN
  IF p_limit IS NULL OR p_limit < 0 THEN
    RAISE EXCEPTION 'a credit limit is zero or more' USING ERRCODE = '22023';
  END IF;
  UPDATE organizations o SET credit_limit = p_limit WHERE o.id = p_org;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'organization % not found', p_org USING ERRCODE = 'P0002';
  END IF;
  INSERT INTO credit_line_changes (organization_id, credit_limit, reason) VALUES (p_org, p_limit, p_reason);
  RETURN QUERY SELECT o.credit_limit, o.debt FROM organizations o WHERE o.id = p_org;
END $$;
GRANT EXECUTE ON FUNCTION set_credit_limit(uuid, bigint, text) TO credits_app;

-- Settle the debt changes of one batch, staged by the settler (ledger/settlement.py)
-- into settle_debt (seq: stream order; one row per overdrawing usage event, per hold
-- made on the credit line, per close that returned some of it, per repaying grant
-- push). Called right after settle_staged, which locked the batch's organizations. A
-- batch's usage overdraws are one entry per organization, keyed like its usage entry
-- ('usage:' || batch): its usage events are all new, or the batch is staged again
-- without them (migrations/0008), so each counts once. The others are keyed by their
-- own reference (a hold 'hold:<id>', an open hold's line is read back by a cold load;
-- a close 'close:<event>'; a repayment its grant); one already recorded is skipped.
CREATE FUNCTION settle_staged_debt(p_batch text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  v_debt bigint;
BEGIN
  FOR r IN
    SELECT s.org, s.kind, s.reference, s.grant_id, sum(s.amount) AS amount, min(s.seq) AS seq,
           max(s.created_at) AS created_at
      FROM (SELECT x.org, CASE x.kind WHEN 'hold_overdraw' THEN 'overdraw' ELSE x.kind END AS kind,
                   x.grant_id, x.amount, x.seq, x.created_at,
                   CASE x.kind WHEN 'overdraw' THEN 'usage:' || p_batch ELSE x.reference END AS reference
              FROM settle_debt x) s
     GROUP BY s.org, s.kind, s.reference, s.grant_id
     ORDER BY min(s.seq)
  LOOP
    IF r.amount = 0 OR EXISTS (SELECT 1 FROM debt_entries d
                                WHERE d.organization_id = r.org AND d.type = r.kind AND d.reference = r.reference) THEN
      CONTINUE;
    END IF;
    UPDATE organizations o SET debt = o.debt + r.amount WHERE o.id = r.org RETURNING o.debt INTO v_debt;
    INSERT INTO debt_entries (organization_id, type, amount, debt_after, grant_id, reference, created_at)
    VALUES (r.org, r.kind, r.amount, v_debt, r.grant_id, r.reference, r.created_at);
    IF r.kind = 'repayment' THEN  -- what the grant repaid is not spendable
      UPDATE credit_grants g SET remaining = g.remaining + r.amount WHERE g.id = r.grant_id;
    END IF;
  END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION settle_staged_debt(text) TO credits_settler;
