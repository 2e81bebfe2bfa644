-- The ops console (issue 11): operators as principals of their own, their sessions and
-- one-time sign-in links, an append-only audit trail, and a database role that reads
-- across organizations and writes nothing directly.
--
-- 1. credits_console: not owner, not superuser, not BYPASSRLS. Row-level security still
--    applies to it; a `console` policy FOR SELECT on each tenant table lets it read
--    every organization there, and it holds no INSERT, UPDATE or DELETE on any table.
--    What it may change (an operator's session, password, an audit row) it changes
--    through the SECURITY DEFINER functions below, each doing one checked thing.
--    Money never moves through this role: the console grants, adjusts and revokes
--    through the same Ledger (credits_app, one organization per transaction) and the
--    same stored procedures as the CLI (accounts/admin.py), ledger first, then cache.
-- 2. operators, operator_links, operator_sessions: row-level security ENABLEd (not
--    FORCEd): the owner (the CLI's `credits operator create`, which needs the owner's
--    URL, and the functions below) writes them; credits_app and credits_settler hold no
--    privilege on them at all; credits_console reads them (never a password hash).
-- 3. operator_audit: who (an operator, or the system user who ran the CLI), what,
--    when, from where, the reason, the outcome. Append-only for every role: no
--    application role holds UPDATE, DELETE or TRUNCATE, and triggers refuse them to
--    everyone, the owner included (as 0009 does for the ledger). Rows arrive only
--    through record_audit(), which credits_app (the CLI, the console's money actions)
--    and credits_console may call.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credits_console') THEN
    CREATE ROLE credits_console LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
  END IF;
EXCEPTION WHEN duplicate_object THEN
  NULL;  -- another database's migration created it at the same moment
END $$;

CREATE TABLE operators (
  id uuid PRIMARY KEY,
  email text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254 AND email LIKE '%_@_%'),
  name text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
  password_hash text,                                   -- argon2id (PHC string), set by the operator
  created_by text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  password_set_at timestamptz,
  disabled_at timestamptz,
  UNIQUE (email)
);

-- One-time sign-in links: only the token's sha256 is kept.
CREATE TABLE operator_links (
  id uuid PRIMARY KEY,
  operator_id uuid NOT NULL REFERENCES operators(id),
  token_hash bytea NOT NULL UNIQUE,
  created_by text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  used_at timestamptz,
  CHECK (expires_at <= created_at + interval '7 days')
);

-- Browser sessions: the cookie carries a secret, only its sha256 is kept; expire, and
-- can be revoked (signing out, disabling the operator, `credits operator revoke`).
CREATE TABLE operator_sessions (
  id uuid PRIMARY KEY,
  operator_id uuid NOT NULL REFERENCES operators(id),
  secret_hash bytea NOT NULL UNIQUE,
  csrf_token text NOT NULL,
  method text NOT NULL CHECK (method IN ('password', 'link')),
  source text NOT NULL DEFAULT '',                      -- the client's address at sign-in
  user_agent text NOT NULL DEFAULT '' CHECK (length(user_agent) <= 500),
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  revoked_at timestamptz,
  CHECK (expires_at <= created_at + interval '7 days')
);
CREATE INDEX operator_sessions_operator ON operator_sessions (operator_id) WHERE revoked_at IS NULL;

CREATE TABLE operator_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  actor text NOT NULL CHECK (length(actor) BETWEEN 1 AND 300),   -- operator:<email> | system:<user>@<host>
  operator_id uuid REFERENCES operators(id),
  via text NOT NULL CHECK (via IN ('console', 'cli')),
  action text NOT NULL CHECK (action ~ '^[a-z_]+(\.[a-z_]+)+$'),  -- e.g. credits.grant, key.revoke
  organization_id uuid,
  target text NOT NULL DEFAULT '' CHECK (length(target) <= 300),  -- a grant, key or event id
  amount bigint,                                                  -- millicredits, signed as it moved
  reason text NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
  reference text NOT NULL DEFAULT '' CHECK (length(reference) <= 255),
  outcome text NOT NULL CHECK (outcome IN ('applied', 'replayed', 'refused')),
  detail jsonb NOT NULL DEFAULT '{}',
  source text NOT NULL DEFAULT '' CHECK (length(source) <= 300)   -- from where: an address, a host
);
CREATE INDEX operator_audit_org ON operator_audit (organization_id, id DESC);
CREATE INDEX operator_audit_at ON operator_audit (at DESC, id DESC);

CREATE TRIGGER operator_audit_append_only BEFORE UPDATE OR DELETE ON operator_audit
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER operator_audit_no_truncate BEFORE TRUNCATE ON operator_audit
  FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['operators', 'operator_links', 'operator_sessions', 'operator_audit'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, credits_app, credits_settler', t);
    EXECUTE format('CREATE POLICY console ON %I FOR SELECT TO credits_console USING (true)', t);
  END LOOP;
END $$;
GRANT SELECT (id, email, name, created_by, created_at, password_set_at, disabled_at) ON operators TO credits_console;
GRANT SELECT (id, operator_id, created_by, created_at, expires_at, used_at) ON operator_links TO credits_console;
GRANT SELECT ON operator_sessions, operator_audit TO credits_console;

-- Explicit read policies for the console on the tenant tables, and SELECT on them.
-- Left out: idempotency_records (stored answers, which hold secrets shown once),
-- portal_links and portal_sessions (tenants' credentials); api_keys without key_hash,
-- balance_alerts without the signing secret.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['organizations', 'departments', 'api_keys', 'credit_grants', 'ledger_entries',
    'grant_outbox', 'usage_events', 'reservations', 'reservation_allocations', 'action_costs', 'balance_alerts',
    'webhook_deliveries', 'usage_hourly', 'settlement_dead_letters', 'credential_spend', 'department_spend_daily',
    'credit_adjustments', 'billing_customers', 'billing_subscriptions', 'billing_invoices', 'billing_payments',
    'billing_payment_methods', 'billing_grants', 'billing_clawbacks', 'stripe_events'] LOOP
    EXECUTE format('CREATE POLICY console ON %I FOR SELECT TO credits_console USING (true)', t);
    IF t NOT IN ('api_keys', 'balance_alerts') THEN
      EXECUTE format('GRANT SELECT ON %I TO credits_console', t);
    END IF;
  END LOOP;
END $$;
GRANT SELECT (id, organization_id, prefix, name, role, department_id, cap, rate_limit_per_s, rate_limit_burst,
  created_at, revoked_at) ON api_keys TO credits_console;
GRANT SELECT (organization_id, threshold, webhook_url, state, updated_at) ON balance_alerts TO credits_console;
GRANT SELECT ON settlement_watermarks, settlement_batches, settlement_fences, billing_plans, billing_credit_packages,
  default_action_costs TO credits_console;
GRANT EXECUTE ON FUNCTION current_org() TO credits_console;

-- The audit trail's one door. `p_operator_email` names an operator (its id is looked
-- up, and a disabled or unknown one is refused), or is NULL for a system user.
CREATE FUNCTION record_audit(p_actor text, p_operator_email text, p_via text, p_action text, p_org uuid,
                             p_target text, p_amount bigint, p_reason text, p_reference text, p_outcome text,
                             p_detail jsonb, p_source text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_operator uuid;
  v_id bigint;
BEGIN
  IF p_operator_email IS NOT NULL THEN
    SELECT o.id INTO v_operator FROM operators o WHERE o.email = lower(p_operator_email) AND o.disabled_at IS NULL;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'no active operator %', p_operator_email USING ERRCODE = 'P0002';
    END IF;
  END IF;
  INSERT INTO operator_audit (actor, operator_id, via, action, organization_id, target, amount, reason, reference,
                              outcome, detail, source)
  VALUES (p_actor, v_operator, p_via, p_action, p_org, coalesce(p_target, ''), p_amount, coalesce(p_reason, ''),
          coalesce(p_reference, ''), p_outcome, coalesce(p_detail, '{}'), coalesce(p_source, ''))
  RETURNING id INTO v_id;
  RETURN v_id;
END $$;

-- Whether an operator may act (the CLI checks before it moves money, so that an
-- action is never done and then found unattributable).
CREATE FUNCTION operator_active(p_email text)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT EXISTS (SELECT 1 FROM operators o WHERE o.email = lower(p_email) AND o.disabled_at IS NULL)
$$;

-- Operators (the owner only: `credits operator create|link|revoke` connect as it).
CREATE FUNCTION operator_create(p_email text, p_name text, p_created_by text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE v_id uuid := gen_random_uuid();
BEGIN
  INSERT INTO operators (id, email, name, created_by) VALUES (v_id, lower(p_email), coalesce(p_name, ''), p_created_by);
  RETURN v_id;
END $$;

-- A sign-in link: redeemed once, before it expires, by an operator not disabled; it
-- starts a session (and says so in the audit trail). The answer's outcome is ok, or
-- why not: unknown, used, expired, disabled.
CREATE FUNCTION operator_redeem_link(p_token_hash bytea, p_secret_hash bytea, p_csrf text, p_ttl_s integer,
                                     p_source text, p_user_agent text)
RETURNS TABLE (outcome text, session_id uuid, operator_id uuid, email text, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_link operator_links%ROWTYPE;
  v_op operators%ROWTYPE;
  v_session uuid := gen_random_uuid();
  v_expires timestamptz;
BEGIN
  SELECT * INTO v_link FROM operator_links l WHERE l.token_hash = p_token_hash FOR UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'unknown'::text, NULL::uuid, NULL::uuid, NULL::text, NULL::timestamptz;
    RETURN;
  END IF;
  SELECT * INTO v_op FROM operators o WHERE o.id = v_link.operator_id;
  IF v_link.used_at IS NOT NULL THEN
    RETURN QUERY SELECT 'used'::text, NULL::uuid, v_op.id, v_op.email, NULL::timestamptz;
    RETURN;
  END IF;
  IF v_link.expires_at <= now() THEN
    RETURN QUERY SELECT 'expired'::text, NULL::uuid, v_op.id, v_op.email, NULL::timestamptz;
    RETURN;
  END IF;
  IF v_op.disabled_at IS NOT NULL THEN
    RETURN QUERY SELECT 'disabled'::text, NULL::uuid, v_op.id, v_op.email, NULL::timestamptz;
    RETURN;
  END IF;
  UPDATE operator_links SET used_at = now() WHERE id = v_link.id;
  v_expires := now() + make_interval(secs => least(p_ttl_s, 7 * 86400));
  INSERT INTO operator_sessions (id, operator_id, secret_hash, csrf_token, method, source, user_agent, expires_at)
  VALUES (v_session, v_op.id, p_secret_hash, p_csrf, 'link', coalesce(p_source, ''), left(coalesce(p_user_agent, ''), 500),
          v_expires);
  INSERT INTO operator_audit (actor, operator_id, via, action, target, outcome, source)
  VALUES ('operator:' || v_op.email, v_op.id, 'console', 'operator.sign_in', 'link:' || v_link.id, 'applied',
          coalesce(p_source, ''));
  RETURN QUERY SELECT 'ok'::text, v_session, v_op.id, v_op.email, v_expires;
END $$;

-- The argon2 hash of an active operator, for the console to verify a password with
-- (the KDF runs in the application: argon2-cffi). Not readable any other way.
CREATE FUNCTION operator_password_hash(p_email text)
RETURNS TABLE (operator_id uuid, password_hash text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT o.id, o.password_hash FROM operators o
   WHERE o.email = lower(p_email) AND o.disabled_at IS NULL AND o.password_hash IS NOT NULL
$$;

-- A session after a verified password (or, on `outcome` refused, only the audit row
-- of the failed attempt: p_secret_hash NULL).
CREATE FUNCTION operator_password_session(p_operator uuid, p_email text, p_secret_hash bytea, p_csrf text,
                                          p_ttl_s integer, p_source text, p_user_agent text)
RETURNS TABLE (session_id uuid, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_session uuid := gen_random_uuid();
  v_expires timestamptz := now() + make_interval(secs => least(p_ttl_s, 7 * 86400));
BEGIN
  IF p_secret_hash IS NULL THEN
    INSERT INTO operator_audit (actor, operator_id, via, action, outcome, source, detail)
    VALUES ('operator:' || lower(left(p_email, 254)), (SELECT id FROM operators WHERE email = lower(p_email)),
            'console', 'operator.sign_in', 'refused', coalesce(p_source, ''), '{"method": "password"}');
    RETURN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM operators o WHERE o.id = p_operator AND o.disabled_at IS NULL) THEN
    RETURN;
  END IF;
  INSERT INTO operator_sessions (id, operator_id, secret_hash, csrf_token, method, source, user_agent, expires_at)
  VALUES (v_session, p_operator, p_secret_hash, p_csrf, 'password', coalesce(p_source, ''),
          left(coalesce(p_user_agent, ''), 500), v_expires);
  INSERT INTO operator_audit (actor, operator_id, via, action, outcome, source, detail)
  SELECT 'operator:' || o.email, o.id, 'console', 'operator.sign_in', 'applied', coalesce(p_source, ''),
         '{"method": "password"}' FROM operators o WHERE o.id = p_operator;
  RETURN QUERY SELECT v_session, v_expires;
END $$;

-- The signed-in operator sets (or changes) their own password: only the holder of a
-- live session may, and only for that session's operator.
CREATE FUNCTION operator_set_password(p_secret_hash bytea, p_password_hash text, p_source text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE v_op operators%ROWTYPE;
BEGIN
  IF p_password_hash IS NULL OR p_password_hash NOT LIKE '$argon2id$%' THEN
    RAISE EXCEPTION 'an argon2id hash is required' USING ERRCODE = '22023';
  END IF;
  SELECT o.* INTO v_op FROM operator_sessions s JOIN operators o ON o.id = s.operator_id
   WHERE s.secret_hash = p_secret_hash AND s.revoked_at IS NULL AND s.expires_at > now() AND o.disabled_at IS NULL;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  UPDATE operators SET password_hash = p_password_hash, password_set_at = now() WHERE id = v_op.id;
  INSERT INTO operator_audit (actor, operator_id, via, action, outcome, source)
  VALUES ('operator:' || v_op.email, v_op.id, 'console', 'operator.password_set', 'applied', coalesce(p_source, ''));
  RETURN true;
END $$;

-- Signing out ends the session whose secret the cookie carries.
CREATE FUNCTION operator_end_session(p_secret_hash bytea, p_source text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE v_row record;
BEGIN
  UPDATE operator_sessions s SET revoked_at = now() WHERE s.secret_hash = p_secret_hash AND s.revoked_at IS NULL
  RETURNING s.id, s.operator_id INTO v_row;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  INSERT INTO operator_audit (actor, operator_id, via, action, target, outcome, source)
  SELECT 'operator:' || o.email, o.id, 'console', 'operator.sign_out', 'session:' || v_row.id, 'applied',
         coalesce(p_source, '') FROM operators o WHERE o.id = v_row.operator_id;
  RETURN true;
END $$;

-- An operator ends another of their own sessions (a browser left signed in elsewhere):
-- only from a live session of the same operator.
CREATE FUNCTION operator_end_own_session(p_secret_hash bytea, p_session uuid, p_source text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE v_op operators%ROWTYPE;
BEGIN
  SELECT o.* INTO v_op FROM operator_sessions s JOIN operators o ON o.id = s.operator_id
   WHERE s.secret_hash = p_secret_hash AND s.revoked_at IS NULL AND s.expires_at > now() AND o.disabled_at IS NULL;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  UPDATE operator_sessions SET revoked_at = now()
   WHERE id = p_session AND operator_id = v_op.id AND revoked_at IS NULL;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  INSERT INTO operator_audit (actor, operator_id, via, action, target, outcome, source)
  VALUES ('operator:' || v_op.email, v_op.id, 'console', 'operator.session_end', 'session:' || p_session, 'applied',
          coalesce(p_source, ''));
  RETURN true;
END $$;

REVOKE ALL ON FUNCTION record_audit(text, text, text, text, uuid, text, bigint, text, text, text, jsonb, text),
  operator_create(text, text, text), operator_active(text),
  operator_redeem_link(bytea, bytea, text, integer, text, text), operator_password_hash(text),
  operator_password_session(uuid, text, bytea, text, integer, text, text), operator_set_password(bytea, text, text),
  operator_end_session(bytea, text), operator_end_own_session(bytea, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION record_audit(text, text, text, text, uuid, text, bigint, text, text, text, jsonb, text)
  TO credits_app, credits_console;
GRANT EXECUTE ON FUNCTION operator_active(text) TO credits_app, credits_console;
GRANT EXECUTE ON FUNCTION operator_redeem_link(bytea, bytea, text, integer, text, text),
  operator_password_hash(text), operator_password_session(uuid, text, bytea, text, integer, text, text),
  operator_set_password(bytea, text, text), operator_end_session(bytea, text),
  operator_end_own_session(bytea, uuid, text) TO credits_console;
