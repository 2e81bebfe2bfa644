-- The authoritative ledger. Amounts are bigint millicredits (1 credit = 1000).
-- Every tenant table carries organization_id and is guarded by row-level security,
-- FORCEd so that even the owner obeys it; the services connect as credits_app, which
-- is neither owner nor superuser nor BYPASSRLS, and set app.organization_id per
-- transaction (ledger/db.py).

CREATE FUNCTION current_org() RETURNS uuid
LANGUAGE sql STABLE AS $$
  SELECT NULLIF(current_setting('app.organization_id', true), '')::uuid
$$;

CREATE TABLE organizations (
  id uuid PRIMARY KEY,
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  balance bigint NOT NULL DEFAULT 0,
  cache_gen bigint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE departments (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  limit_amount bigint CHECK (limit_amount >= 0),       -- NULL: no limit
  period text NOT NULL DEFAULT 'month' CHECK (period IN ('day', 'week', 'month')),
  limit_generation bigint NOT NULL DEFAULT 0,           -- bumped by every admin set
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, name)
);

CREATE TABLE api_keys (
  id uuid PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  key_hash bytea NOT NULL UNIQUE,                       -- sha256 of the secret
  prefix text NOT NULL,                                 -- shown to people, not a secret
  name text NOT NULL DEFAULT '',
  role text NOT NULL CHECK (role IN ('agent', 'admin')),
  department_id uuid REFERENCES departments(id),        -- scope: charges go here
  cap bigint CHECK (cap >= 0),                          -- lifetime spend cap, NULL none
  rate_limit_per_s double precision CHECK (rate_limit_per_s >= 0),
  rate_limit_burst double precision CHECK (rate_limit_burst >= 1),
  created_at timestamptz NOT NULL DEFAULT now(),
  revoked_at timestamptz
);

-- The one table read before the organization is known (authentication). No tenant
-- data, no RLS; the services reach it only through authenticate_api_key().
CREATE TABLE api_key_index (
  key_hash bytea PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id)
);

CREATE TABLE credit_grants (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id uuid NOT NULL REFERENCES organizations(id),
  source text NOT NULL CHECK (source IN ('signup_bonus', 'subscription', 'purchase', 'admin')),
  amount bigint NOT NULL CHECK (amount > 0),
  remaining bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
  priority integer NOT NULL CHECK (priority BETWEEN 0 AND 899),
  expires_at timestamptz,
  reference text NOT NULL,                              -- idempotency: one grant per reference
  reason text NOT NULL DEFAULT '',
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, source, reference)
);
CREATE INDEX credit_grants_live ON credit_grants (organization_id) WHERE remaining > 0;

CREATE TABLE ledger_entries (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  type text NOT NULL CHECK (type IN ('grant', 'usage', 'reservation_capture', 'expiration',
                                      'adjustment', 'refund')),
  amount bigint NOT NULL,                               -- signed change of the balance
  balance_after bigint NOT NULL,
  grant_id uuid REFERENCES credit_grants(id),
  reference text NOT NULL,
  reason text NOT NULL DEFAULT '',
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, type, reference)
);
CREATE INDEX ledger_entries_org_id ON ledger_entries (organization_id, id DESC);

-- Grants written to the ledger and not yet confirmed in the cache (outbox).
CREATE TABLE grant_outbox (
  grant_id uuid PRIMARY KEY REFERENCES credit_grants(id),
  organization_id uuid NOT NULL REFERENCES organizations(id),
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  created_at timestamptz NOT NULL DEFAULT now()
);

-- The one high-volume table. No foreign key to organizations: a per-row RI check
-- would dominate bulk settlement, and settle_staged() locks (so proves) every
-- organization of a batch before inserting its events.
CREATE TABLE usage_events (
  organization_id uuid NOT NULL,
  id text NOT NULL,                                     -- event id from the hot path
  action text NOT NULL,
  units bigint NOT NULL CHECK (units >= 1),
  credits bigint NOT NULL CHECK (credits >= 0),
  department_id uuid,
  credential_id text NOT NULL,
  metadata jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL,
  PRIMARY KEY (organization_id, id)
);
CREATE INDEX usage_events_org_time ON usage_events (organization_id, created_at DESC, id DESC);

CREATE TABLE reservations (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text NOT NULL,
  amount bigint NOT NULL CHECK (amount > 0),
  used bigint NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= amount),
  status text NOT NULL CHECK (status IN ('open', 'released', 'expired')),
  department_id uuid,
  credential_id text NOT NULL,
  action text NOT NULL DEFAULT '',
  expires_at timestamptz NOT NULL,
  created_at timestamptz NOT NULL,
  closed_at timestamptz,
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE default_action_costs (
  action text PRIMARY KEY,
  credits bigint NOT NULL CHECK (credits >= 0),         -- millicredits per unit
  unit text NOT NULL,
  description text NOT NULL
);

CREATE TABLE action_costs (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  action text NOT NULL CHECK (action ~ '^[a-z][a-z0-9_.:-]{0,63}$'),
  credits bigint NOT NULL CHECK (credits >= 0),
  unit text NOT NULL,
  description text NOT NULL DEFAULT '',
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, action)
);

-- Stored responses of mutating endpoints outside the Lua hot path.
CREATE TABLE idempotency_records (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  key text NOT NULL,
  fingerprint text NOT NULL,
  status integer NOT NULL,
  response bytea NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, key)
);

INSERT INTO default_action_costs (action, credits, unit, description) VALUES
  ('generate_content', 1000, 'request', 'Generate a piece of content'),
  ('analyze_data', 2000, 'request', 'Analyze a data set'),
  ('web_search', 500, 'request', 'One web search'),
  ('summarize', 500, 'request', 'Summarize a document'),
  ('image_generation', 5000, 'image', 'Generate one image'),
  ('llm_input_tokens', 1, 'token', 'Model input, per token (0.001 credits)'),
  ('llm_output_tokens', 2, 'token', 'Model output, per token (0.002 credits)'),
  ('tool_call', 100, 'call', 'One tool invocation');

-- Row-level security on every tenant table.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['departments', 'api_keys', 'credit_grants', 'ledger_entries',
    'grant_outbox', 'usage_events', 'reservations', 'action_costs', 'idempotency_records']
  LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
  END LOOP;
END $$;
ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON organizations USING (id = current_org()) WITH CHECK (id = current_org());

-- Grant credits: the ledger entry, the grant, the balance and the outbox row, all or
-- nothing. Idempotent per (organization, source, reference). The organization row is
-- locked first, so two calls with the same reference serialize and the second sees
-- the first's grant.
CREATE FUNCTION grant_credits(p_org uuid, p_source text, p_amount bigint, p_priority integer,
                              p_expires_at timestamptz, p_reference text, p_reason text)
RETURNS TABLE (grant_id uuid, created boolean, balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_grant uuid;
  v_balance bigint;
BEGIN
  IF p_amount IS NULL OR p_amount <= 0 THEN
    RAISE EXCEPTION 'grant amount must be positive' USING ERRCODE = '22023';
  END IF;
  SELECT o.balance INTO v_balance FROM organizations o WHERE o.id = p_org FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'organization % not found', p_org USING ERRCODE = 'P0002';
  END IF;
  SELECT g.id INTO v_grant FROM credit_grants g
   WHERE g.organization_id = p_org AND g.source = p_source AND g.reference = p_reference;
  IF FOUND THEN
    RETURN QUERY SELECT v_grant, false, v_balance;
    RETURN;
  END IF;
  v_grant := gen_random_uuid();
  INSERT INTO credit_grants (id, organization_id, source, amount, remaining, priority,
                             expires_at, reference, reason)
  VALUES (v_grant, p_org, p_source, p_amount, p_amount, p_priority, p_expires_at,
          p_reference, p_reason);
  UPDATE organizations SET balance = balance + p_amount WHERE id = p_org
  RETURNING balance INTO v_balance;
  INSERT INTO ledger_entries (organization_id, type, amount, balance_after, grant_id,
                              reference, reason)
  VALUES (p_org, 'grant', p_amount, v_balance, v_grant, p_source || ':' || p_reference, p_reason);
  INSERT INTO grant_outbox (grant_id, organization_id) VALUES (v_grant, p_org);
  RETURN QUERY SELECT v_grant, true, v_balance;
END $$;

-- Create an organization with its default costs and the 100-credit signup bonus.
CREATE FUNCTION create_organization(p_org uuid, p_name text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  v_balance bigint;
BEGIN
  IF current_org() IS DISTINCT FROM p_org THEN
    RAISE EXCEPTION 'organization context does not match' USING ERRCODE = '42501';
  END IF;
  INSERT INTO organizations (id, name) VALUES (p_org, p_name);
  INSERT INTO action_costs (organization_id, action, credits, unit, description)
  SELECT p_org, action, credits, unit, description FROM default_action_costs;
  SELECT balance_after INTO v_balance
    FROM grant_credits(p_org, 'signup_bonus', 100000, 0, NULL, 'signup', 'signup bonus');
  RETURN v_balance;
END $$;

-- Authentication by key hash, before the organization is known. Runs as the owner to
-- read the index, then sets the organization context for this transaction only, so
-- the key row itself is still read under row-level security.
CREATE FUNCTION authenticate_api_key(p_hash bytea)
RETURNS TABLE (id uuid, organization_id uuid, role text, department_id uuid)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_org uuid;
BEGIN
  SELECT i.organization_id INTO v_org FROM api_key_index i WHERE i.key_hash = p_hash;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM set_config('app.organization_id', v_org::text, true);
  RETURN QUERY SELECT k.id, k.organization_id, k.role, k.department_id FROM api_keys k
   WHERE k.key_hash = p_hash AND k.revoked_at IS NULL;
END $$;

-- Register a key in the index; only for the organization of the current context.
CREATE FUNCTION index_api_key(p_hash bytea)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.key_hash = p_hash) THEN
    RAISE EXCEPTION 'no such key in this organization' USING ERRCODE = '42501';
  END IF;
  INSERT INTO api_key_index (key_hash, organization_id) VALUES (p_hash, current_org());
END $$;

-- A dedicated role for the services, created by the migration runner (ledger/migrate.py)
-- because its password comes from configuration.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credits_app') THEN
    CREATE ROLE credits_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
  END IF;
EXCEPTION WHEN duplicate_object THEN
  NULL;  -- another database's migration created it at the same moment
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON organizations, departments, api_keys, credit_grants,
  ledger_entries, grant_outbox, usage_events, reservations, action_costs,
  idempotency_records TO credits_app;
GRANT SELECT ON default_action_costs TO credits_app;
REVOKE ALL ON api_key_index FROM credits_app;
REVOKE ALL ON FUNCTION authenticate_api_key(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION index_api_key(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION authenticate_api_key(bytea), index_api_key(bytea),
  grant_credits(uuid, text, bigint, integer, timestamptz, text, text),
  create_organization(uuid, text), current_org() TO credits_app;
