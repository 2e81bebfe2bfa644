-- The ledger only grows (issue 8, item 9). Until here credits_app could UPDATE and
-- DELETE ledger entries, usage events and grants. Now, for every role:
--   ledger_entries, usage_events, reservation_allocations   insert only;
--   credit_grants   insert, and settlement moving `remaining` (nothing else changes);
--   reservations    insert, and settlement closing an open one (status, used, closed_at).
-- Privileges say it for the application roles, and triggers say it for everyone,
-- the owner included (a migration that had to change history would drop a trigger in
-- its own transaction, visibly).

REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries, usage_events, credit_grants, reservations,
  reservation_allocations FROM credits_app, credits_settler;
REVOKE INSERT ON usage_events, reservations, reservation_allocations FROM credits_app;  -- settlement's alone
GRANT UPDATE (remaining) ON credit_grants TO credits_settler;
GRANT UPDATE (status, used, closed_at) ON reservations TO credits_settler;

CREATE FUNCTION refuse_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE FUNCTION guard_grant_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (NEW.id, NEW.organization_id, NEW.source, NEW.amount, NEW.priority, NEW.expires_at, NEW.reference,
      NEW.reason, NEW.created_at)
     IS DISTINCT FROM (OLD.id, OLD.organization_id, OLD.source, OLD.amount, OLD.priority, OLD.expires_at,
      OLD.reference, OLD.reason, OLD.created_at) THEN
    RAISE EXCEPTION 'credit_grants: only settlement moves remaining' USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;

CREATE FUNCTION guard_reservation_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.status <> 'open' THEN
    RAISE EXCEPTION 'reservations: % is closed; a closed reservation never changes', OLD.id
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF (NEW.organization_id, NEW.id, NEW.amount, NEW.department_id, NEW.credential_id, NEW.action, NEW.expires_at,
      NEW.created_at, NEW.metadata)
     IS DISTINCT FROM (OLD.organization_id, OLD.id, OLD.amount, OLD.department_id, OLD.credential_id, OLD.action,
      OLD.expires_at, OLD.created_at, OLD.metadata) THEN
    RAISE EXCEPTION 'reservations: only closing one changes it' USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['ledger_entries', 'usage_events', 'reservation_allocations'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change()',
                   t || '_append_only', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['ledger_entries', 'usage_events', 'reservation_allocations', 'credit_grants',
                           'reservations'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change()',
                   t || '_no_truncate', t);
  END LOOP;
END $$;
CREATE TRIGGER credit_grants_remaining_only BEFORE UPDATE ON credit_grants
  FOR EACH ROW EXECUTE FUNCTION guard_grant_change();
CREATE TRIGGER credit_grants_append_only BEFORE DELETE ON credit_grants
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER reservations_close_only BEFORE UPDATE ON reservations
  FOR EACH ROW EXECUTE FUNCTION guard_reservation_change();
CREATE TRIGGER reservations_append_only BEFORE DELETE ON reservations
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
