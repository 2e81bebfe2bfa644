-- Billing (issue #4): the catalog (plans, credit packages) linked to Stripe, each
-- organization's mirror of its Stripe objects, the grants and clawbacks billing made,
-- and the queue of Stripe webhook events. Money is integer cents (Stripe's minor units)
-- with a lowercase ISO currency; credits are bigint millicredits (1 credit = 1000).
--
-- Tenant tables carry organization_id and the same FORCEd `tenant` policy as 0001.
-- Three functions cross tenants, in the style of authenticate_api_key: they run as the
-- owner, see only the routing index (Stripe id -> organization), and set the
-- organization context for the rest of the caller's transaction.

-- -- Catalog: the same for every organization ------------------------------------------
CREATE TABLE billing_plans (
  id text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,31}$'),
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  description text NOT NULL DEFAULT '',
  price_cents bigint NOT NULL CHECK (price_cents > 0),
  currency text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  billing_interval text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  credits_per_period bigint NOT NULL CHECK (credits_per_period > 0),   -- millicredits
  features jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(features) = 'array'),
  position integer NOT NULL,
  active boolean NOT NULL DEFAULT true,
  stripe_product_id text UNIQUE,                        -- set by the catalog sync
  stripe_price_id text UNIQUE,                          -- a Price (Stripe) or Plan (localstripe) id
  synced_at timestamptz
);

CREATE TABLE billing_credit_packages (
  id text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,31}$'),
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  credits bigint NOT NULL CHECK (credits > 0),           -- millicredits
  price_cents bigint NOT NULL CHECK (price_cents > 0),
  currency text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  position integer NOT NULL,
  active boolean NOT NULL DEFAULT true,
  stripe_product_id text UNIQUE,
  synced_at timestamptz
);

INSERT INTO billing_plans (id, name, description, price_cents, currency, billing_interval, credits_per_period,
                           features, position) VALUES
  ('starter', 'Starter', 'Basic features for one project', 2900, 'usd', 'month', 500000,
   '["Basic features", "1 project"]', 1),
  ('professional', 'Professional', 'API access for up to five projects', 9900, 'usd', 'month', 2000000,
   '["API access", "5 projects"]', 2),
  ('enterprise', 'Enterprise', 'Unlimited projects and custom integrations', 29900, 'usd', 'month', 10000000,
   '["Unlimited projects", "Custom integrations"]', 3);

INSERT INTO billing_credit_packages (id, name, credits, price_cents, currency, position) VALUES
  ('small', 'Small', 100000, 990, 'usd', 1),
  ('medium', 'Medium', 500000, 3990, 'usd', 2),
  ('large', 'Large', 2000000, 14990, 'usd', 3),
  ('jumbo', 'Jumbo', 5000000, 34990, 'usd', 4);

-- -- Per organization -------------------------------------------------------------------
-- One Stripe customer per organization. The row exists before Stripe answers (with the
-- idempotency key of the create call), so a retry or a concurrent request reuses it.
CREATE TABLE billing_customers (
  organization_id uuid PRIMARY KEY REFERENCES organizations(id),
  id uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
  stripe_customer_id text UNIQUE,                       -- NULL until Stripe answered
  email text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
  name text CHECK (name IS NULL OR length(name) BETWEEN 1 AND 200),
  default_payment_method_id text,
  creation_key text NOT NULL,                           -- Stripe idempotency key of the create
  subscription_lock_until timestamptz,                  -- short lease: one subscription change at a time
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing_subscriptions (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text PRIMARY KEY,                                  -- sub_...
  stripe_customer_id text NOT NULL,
  plan_id text REFERENCES billing_plans(id),            -- NULL: a price not in our catalog
  stripe_price_id text,
  stripe_item_id text,
  status text NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing', 'active',
                                         'past_due', 'unpaid', 'paused', 'canceled')),
  current_period_start timestamptz,
  current_period_end timestamptz,
  cancel_at_period_end boolean NOT NULL DEFAULT false,
  canceled_at timestamptz,
  ended_at timestamptz,
  latest_invoice_id text,
  -- Plan credits granted for the current period: which invoice opened the period, its
  -- bounds, and the level reached (an upgrade raises it and grants the difference).
  credits_invoice_id text,
  credits_invoice_created timestamptz,
  credits_period_start timestamptz,
  credits_period_end timestamptz,
  credits_level bigint NOT NULL DEFAULT 0 CHECK (credits_level >= 0),
  created_at timestamptz NOT NULL,                      -- at Stripe
  synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_subscriptions_org ON billing_subscriptions (organization_id, created_at DESC, id DESC);

CREATE TABLE billing_invoices (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text PRIMARY KEY,                                  -- in_...
  subscription_id text,
  number text,
  status text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
  amount_due bigint NOT NULL CHECK (amount_due >= 0),
  amount_paid bigint NOT NULL CHECK (amount_paid >= 0),
  currency text NOT NULL,
  period_start timestamptz,
  period_end timestamptz,
  hosted_invoice_url text,
  payment_intent_id text,
  billing_reason text,
  purpose text NOT NULL CHECK (purpose IN ('period', 'upgrade', 'other')),
  created_at timestamptz NOT NULL,                      -- at Stripe
  synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_invoices_org ON billing_invoices (organization_id, created_at DESC, id DESC);

CREATE TABLE billing_payments (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text PRIMARY KEY,                                  -- the PaymentIntent id (pi_...)
  kind text NOT NULL CHECK (kind IN ('credit_purchase', 'invoice')),
  package_id text REFERENCES billing_credit_packages(id),
  invoice_id text,
  amount bigint NOT NULL CHECK (amount >= 0),
  amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
  currency text NOT NULL,
  status text NOT NULL CHECK (status IN ('requires_payment_method', 'requires_confirmation', 'requires_action',
                                         'processing', 'requires_capture', 'failed', 'canceled', 'succeeded')),
  description text NOT NULL DEFAULT '',
  credits bigint CHECK (credits > 0),                   -- what a package purchase buys
  charge_id text,
  failure_code text,
  failure_message text,
  created_at timestamptz NOT NULL,                      -- at Stripe
  synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_payments_org ON billing_payments (organization_id, created_at DESC, id DESC);
CREATE INDEX billing_payments_charge ON billing_payments (charge_id);

CREATE TABLE billing_payment_methods (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text PRIMARY KEY,                                  -- pm_...
  stripe_customer_id text NOT NULL,
  type text NOT NULL,
  brand text,
  last4 text,
  exp_month integer,
  exp_year integer,
  created_at timestamptz NOT NULL,
  synced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_payment_methods_org ON billing_payment_methods (organization_id, created_at, id);

-- Every grant billing decided, written before the ledger grant (same source and
-- reference, so the ledger's uniqueness makes it exactly once); grant_id is set once
-- the ledger holds it. A crash in between is finished by the next attempt.
CREATE TABLE billing_grants (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  source text NOT NULL CHECK (source IN ('purchase', 'subscription')),
  reference text NOT NULL,
  kind text NOT NULL CHECK (kind IN ('package', 'period', 'upgrade')),
  amount bigint NOT NULL CHECK (amount > 0),
  expires_at timestamptz,
  reason text NOT NULL,
  payment_intent_id text,
  invoice_id text,
  subscription_id text,
  grant_id uuid REFERENCES credit_grants(id),
  created_at timestamptz NOT NULL DEFAULT now(),
  applied_at timestamptz,
  PRIMARY KEY (organization_id, source, reference)
);
CREATE INDEX billing_grants_payment ON billing_grants (organization_id, payment_intent_id);
CREATE INDEX billing_grants_invoice ON billing_grants (organization_id, invoice_id);

-- Credits taken back for a refund or a lost dispute. `wanted` is the paid-for share of
-- the credits, `asked` the unspent part of it, `taken` what the hot path took (never
-- below zero); wanted - taken is what could not be recovered, on record.
CREATE TABLE billing_clawbacks (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  id text PRIMARY KEY,                                  -- refund:re_... | dispute:dp_... (the debit's key)
  cause text NOT NULL CHECK (cause IN ('refund', 'dispute')),
  charge_id text NOT NULL,
  payment_intent_id text,
  money_amount bigint NOT NULL CHECK (money_amount >= 0),
  wanted bigint NOT NULL CHECK (wanted >= 0),
  asked bigint NOT NULL CHECK (asked >= 0 AND asked <= wanted),
  taken bigint CHECK (taken >= 0 AND taken <= asked),
  debit_id text,
  created_at timestamptz NOT NULL DEFAULT now(),
  applied_at timestamptz
);

-- The order of Stripe's statuses: a mirror's status may keep or raise its rank, never
-- lower it (the top rank is final: canceled subscriptions, paid or void invoices,
-- succeeded payments).
CREATE FUNCTION billing_status_rank(p_kind text, p_status text)
RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE p_kind
    WHEN 'subscription' THEN CASE p_status WHEN 'incomplete' THEN 0 WHEN 'trialing' THEN 1 WHEN 'active' THEN 2
      WHEN 'past_due' THEN 2 WHEN 'unpaid' THEN 2 WHEN 'paused' THEN 2 ELSE 3 END
    WHEN 'invoice' THEN CASE p_status WHEN 'draft' THEN 0 WHEN 'open' THEN 1 WHEN 'uncollectible' THEN 2 ELSE 3 END
    WHEN 'payment' THEN CASE p_status WHEN 'failed' THEN 1 WHEN 'canceled' THEN 2 WHEN 'succeeded' THEN 3 ELSE 0 END
  END
$$;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['billing_customers', 'billing_subscriptions', 'billing_invoices', 'billing_payments',
    'billing_payment_methods', 'billing_grants', 'billing_clawbacks']
  LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (organization_id = current_org()) '
                   'WITH CHECK (organization_id = current_org())', t);
  END LOOP;
END $$;

-- -- Routing: which organization a Stripe object belongs to -----------------------------
-- Read before the organization is known (a webhook carries no credential). No tenant
-- data; the services reach it only through the functions below.
CREATE TABLE stripe_object_index (
  stripe_id text PRIMARY KEY,                           -- cus_..., pi_..., ch_...
  organization_id uuid NOT NULL REFERENCES organizations(id)
);

-- -- Webhook events: received (deduplicated by id), then processed by the worker --------
-- RLS is enabled but deliberately not FORCEd: the owner-run functions below must see
-- every organization's queue (and store events of no organization of ours), while
-- credits_app, which is not the owner, still sees only its organization's rows.
CREATE TABLE stripe_events (
  id text PRIMARY KEY,                                  -- evt_...
  organization_id uuid REFERENCES organizations(id),    -- NULL: not about one of ours
  type text NOT NULL,
  status text NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'ignored')),
  stripe_created timestamptz NOT NULL,
  payload jsonb,                                        -- NULL when ignored: not our data
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  last_error text,
  received_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz
);
CREATE INDEX stripe_events_due ON stripe_events (next_attempt_at) WHERE status = 'pending';
ALTER TABLE stripe_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON stripe_events USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());

-- Register a Stripe id for the organization of the current context; only ids its own
-- rows hold (its customer, its payments and their charges).
CREATE FUNCTION index_stripe_object(p_stripe_id text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_owner uuid;
BEGIN
  IF current_org() IS NULL THEN
    RAISE EXCEPTION 'no organization context' USING ERRCODE = '42501';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing_customers c WHERE c.stripe_customer_id = p_stripe_id)
     AND NOT EXISTS (SELECT 1 FROM billing_payments p WHERE p.id = p_stripe_id OR p.charge_id = p_stripe_id) THEN
    RAISE EXCEPTION 'no such Stripe object in this organization' USING ERRCODE = '42501';
  END IF;
  INSERT INTO stripe_object_index (stripe_id, organization_id) VALUES (p_stripe_id, current_org())
  ON CONFLICT (stripe_id) DO NOTHING;
  SELECT i.organization_id INTO v_owner FROM stripe_object_index i WHERE i.stripe_id = p_stripe_id;
  IF v_owner IS DISTINCT FROM current_org() THEN
    RAISE EXCEPTION 'Stripe object belongs to another organization' USING ERRCODE = '42501';
  END IF;
END $$;

-- The organization owning these Stripe ids (a customer, a payment intent, a charge),
-- set as the context of the caller's transaction. NULL when none is known, or when the
-- ids disagree (never guess between two organizations).
CREATE FUNCTION organization_for_stripe_objects(p_stripe_ids text[])
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_orgs uuid[];
BEGIN
  SELECT array_agg(DISTINCT i.organization_id) INTO v_orgs
    FROM stripe_object_index i WHERE i.stripe_id = ANY(p_stripe_ids);
  IF v_orgs IS NULL OR cardinality(v_orgs) <> 1 THEN
    RETURN NULL;
  END IF;
  PERFORM set_config('app.organization_id', v_orgs[1]::text, true);
  RETURN v_orgs[1];
END $$;

-- Store a verified webhook event once. Returns the organization it belongs to (NULL:
-- none of ours, stored as ignored without its payload) and whether it was a duplicate.
CREATE FUNCTION receive_stripe_event(p_id text, p_type text, p_created timestamptz, p_stripe_ids text[],
                                     p_payload jsonb)
RETURNS TABLE (organization_id uuid, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_org uuid;
BEGIN
  v_org := organization_for_stripe_objects(p_stripe_ids);
  INSERT INTO stripe_events (id, organization_id, type, status, stripe_created, payload)
  VALUES (p_id, v_org, p_type, CASE WHEN v_org IS NULL THEN 'ignored' ELSE 'pending' END, p_created,
          CASE WHEN v_org IS NULL THEN NULL ELSE p_payload END)
  ON CONFLICT (id) DO NOTHING;
  IF NOT FOUND THEN
    RETURN QUERY SELECT e.organization_id, true FROM stripe_events e WHERE e.id = p_id;
    RETURN;
  END IF;
  RETURN QUERY SELECT v_org, false;
END $$;

-- Pending events whose next attempt is due, across organizations (ids only).
CREATE FUNCTION due_stripe_events(p_limit integer)
RETURNS TABLE (organization_id uuid, id text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT e.organization_id, e.id FROM stripe_events e
   WHERE e.status = 'pending' AND e.next_attempt_at <= now()
   ORDER BY e.next_attempt_at
   LIMIT least(greatest(p_limit, 0), 1000)
$$;

GRANT SELECT ON billing_plans, billing_credit_packages TO credits_app;
GRANT UPDATE (stripe_product_id, stripe_price_id, synced_at) ON billing_plans TO credits_app;
GRANT UPDATE (stripe_product_id, synced_at) ON billing_credit_packages TO credits_app;
GRANT SELECT, INSERT, UPDATE ON billing_customers, billing_subscriptions, billing_invoices, billing_payments,
  billing_grants, billing_clawbacks TO credits_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON billing_payment_methods TO credits_app;
GRANT SELECT, UPDATE (status, attempts, next_attempt_at, last_error, processed_at) ON stripe_events TO credits_app;
REVOKE ALL ON stripe_object_index FROM credits_app;
REVOKE ALL ON FUNCTION index_stripe_object(text), organization_for_stripe_objects(text[]),
  receive_stripe_event(text, text, timestamptz, text[], jsonb), due_stripe_events(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION index_stripe_object(text), organization_for_stripe_objects(text[]),
  receive_stripe_event(text, text, timestamptz, text[], jsonb), due_stripe_events(integer) TO credits_app;
