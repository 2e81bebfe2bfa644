-- Entitlements (issue 13): the typed features of each plan, per-organization overrides,
-- and the usage of limit features. Postgres holds them; the hot path reads a cached
-- copy (lua/check.lua) that carries a version, so a late push never undoes a newer one.
--
-- A feature is one of three types:
--   boolean  enabled (true/false)                          e.g. api_access
--   limit    limit_value (NULL = unlimited), usage counted e.g. projects
--   config   value (text)                                  e.g. support_tier
-- An organization's features are those of its plan (the plan of its live subscription:
-- active, trialing or past_due), or the free defaults (scope 'free') without one, with
-- its own overrides on top.

CREATE TABLE entitlement_features (
  scope text NOT NULL CHECK (scope ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),   -- 'free' or a plan id
  feature text NOT NULL CHECK (feature ~ '^[a-z][a-z0-9_]{0,63}$'),
  type text NOT NULL CHECK (type IN ('boolean', 'limit', 'config')),
  enabled boolean,
  limit_value bigint CHECK (limit_value >= 0),
  value text CHECK (length(value) <= 1000),
  position integer NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, feature),
  CHECK ((type = 'boolean') = (enabled IS NOT NULL)),
  CHECK (type = 'limit' OR limit_value IS NULL),
  CHECK ((type = 'config') = (value IS NOT NULL))
);

INSERT INTO entitlement_features (scope, feature, type, enabled, limit_value, value, position) VALUES
  ('free', 'api_access', 'boolean', false, NULL, NULL, 1),
  ('free', 'projects', 'limit', NULL, 1, NULL, 2),
  ('free', 'custom_integrations', 'boolean', false, NULL, NULL, 3),
  ('starter', 'api_access', 'boolean', false, NULL, NULL, 1),
  ('starter', 'projects', 'limit', NULL, 1, NULL, 2),
  ('starter', 'custom_integrations', 'boolean', false, NULL, NULL, 3),
  ('professional', 'api_access', 'boolean', true, NULL, NULL, 1),
  ('professional', 'projects', 'limit', NULL, 5, NULL, 2),
  ('professional', 'custom_integrations', 'boolean', false, NULL, NULL, 3),
  ('enterprise', 'api_access', 'boolean', true, NULL, NULL, 1),
  ('enterprise', 'projects', 'limit', NULL, NULL, NULL, 2),
  ('enterprise', 'custom_integrations', 'boolean', true, NULL, NULL, 3);

-- One number for the whole catalog of features: an edit raises it, and every
-- organization's version (below) adds it, so a catalog edit is newer than any cache.
CREATE TABLE entitlement_catalog_version (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  version bigint NOT NULL DEFAULT 0
);
INSERT INTO entitlement_catalog_version DEFAULT VALUES;

CREATE FUNCTION bump_entitlement_catalog() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  UPDATE entitlement_catalog_version SET version = version + 1;
  RETURN NULL;
END $$;
CREATE TRIGGER entitlement_features_bump AFTER INSERT OR UPDATE OR DELETE ON entitlement_features
  FOR EACH STATEMENT EXECUTE FUNCTION bump_entitlement_catalog();

-- Per organization: overrides (set by ops), usage of limit features, and a version
-- that every change raises (plan, override, usage).
CREATE TABLE organization_entitlements (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  feature text NOT NULL CHECK (feature ~ '^[a-z][a-z0-9_]{0,63}$'),
  type text NOT NULL CHECK (type IN ('boolean', 'limit', 'config')),
  enabled boolean,
  limit_value bigint CHECK (limit_value >= 0),
  value text CHECK (length(value) <= 1000),
  reason text NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, feature),
  CHECK ((type = 'boolean') = (enabled IS NOT NULL)),
  CHECK (type = 'limit' OR limit_value IS NULL),
  CHECK ((type = 'config') = (value IS NOT NULL))
);

CREATE TABLE entitlement_usage (
  organization_id uuid NOT NULL REFERENCES organizations(id),
  feature text NOT NULL CHECK (feature ~ '^[a-z][a-z0-9_]{0,63}$'),
  usage bigint NOT NULL DEFAULT 0 CHECK (usage >= 0),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, feature)
);

-- Every change of usage, once per idempotency key (the key is unique per organization,
-- written in the transaction that changes the usage: a retry finds it and replays).
CREATE TABLE entitlement_usage_changes (
  id bigserial PRIMARY KEY,
  organization_id uuid NOT NULL REFERENCES organizations(id),
  feature text NOT NULL,
  delta bigint NOT NULL,
  usage_after bigint NOT NULL CHECK (usage_after >= 0),
  limit_value bigint,                                   -- the limit it was checked against (NULL unlimited)
  idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  fingerprint text,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, idempotency_key)
);
CREATE INDEX entitlement_usage_changes_org ON entitlement_usage_changes (organization_id, feature, id DESC);

CREATE TABLE entitlement_versions (
  organization_id uuid PRIMARY KEY REFERENCES organizations(id),
  version bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION bump_entitlements() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  v_org uuid;
BEGIN
  IF TG_OP = 'DELETE' THEN v_org := OLD.organization_id; ELSE v_org := NEW.organization_id; END IF;
  IF TG_TABLE_NAME = 'billing_subscriptions' AND TG_OP = 'UPDATE' THEN
    -- (nested: plpgsql does not promise to stop at the first false condition)
    IF (NEW.plan_id, NEW.status) IS NOT DISTINCT FROM (OLD.plan_id, OLD.status) THEN
      RETURN NULL;
    END IF;
  END IF;
  INSERT INTO entitlement_versions (organization_id, version) VALUES (v_org, 1)
  ON CONFLICT (organization_id) DO UPDATE SET version = entitlement_versions.version + 1;
  RETURN NULL;
END $$;
CREATE TRIGGER organization_entitlements_bump AFTER INSERT OR UPDATE OR DELETE ON organization_entitlements
  FOR EACH ROW EXECUTE FUNCTION bump_entitlements();
CREATE TRIGGER entitlement_usage_bump AFTER INSERT OR UPDATE ON entitlement_usage
  FOR EACH ROW EXECUTE FUNCTION bump_entitlements();
CREATE TRIGGER billing_subscriptions_entitlements_bump AFTER INSERT OR UPDATE ON billing_subscriptions
  FOR EACH ROW EXECUTE FUNCTION bump_entitlements();

-- The plan whose features an organization has: its newest live subscription's.
-- (Both run as the caller, under row-level security: one organization's only.)
CREATE FUNCTION entitlement_plan(p_org uuid) RETURNS text
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
  SELECT s.plan_id FROM billing_subscriptions s
   WHERE s.organization_id = p_org AND s.plan_id IS NOT NULL
     AND s.status IN ('active', 'trialing', 'past_due')
   ORDER BY s.created_at DESC, s.id DESC LIMIT 1
$$;

-- An organization's features as the cache holds them, read in one statement (one
-- snapshot): the version, the plan ('' = free defaults) and, per feature, the plan's
-- (or free) definition with the organization's override on top, and its usage.
CREATE FUNCTION effective_entitlements(p_org uuid)
RETURNS TABLE (version bigint, plan_id text, feature text, type text, enabled boolean, limit_value bigint,
               value text, usage bigint, overridden boolean)
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
  WITH plan AS (SELECT entitlement_plan(p_org) AS id),
  ver AS (
    SELECT coalesce((SELECT v.version FROM entitlement_versions v WHERE v.organization_id = p_org), 0)
         + (SELECT c.version FROM entitlement_catalog_version c) AS version
  ),
  base AS (
    SELECT f.feature, f.type, f.enabled, f.limit_value, f.value, f.position
      FROM entitlement_features f, plan
     WHERE f.scope = coalesce(plan.id, 'free')
  ),
  merged AS (
    SELECT coalesce(o.feature, b.feature) AS feature,
           coalesce(o.type, b.type) AS type,
           CASE WHEN o.feature IS NOT NULL THEN o.enabled ELSE b.enabled END AS enabled,
           CASE WHEN o.feature IS NOT NULL THEN o.limit_value ELSE b.limit_value END AS limit_value,
           CASE WHEN o.feature IS NOT NULL THEN o.value ELSE b.value END AS value,
           coalesce(b.position, 1000) AS position,
           o.feature IS NOT NULL AS overridden
      FROM base b
      FULL JOIN (SELECT * FROM organization_entitlements WHERE organization_id = p_org) o
        ON o.feature = b.feature
  )
  SELECT ver.version, coalesce(plan.id, ''), m.feature, m.type, m.enabled, m.limit_value, m.value,
         coalesce(u.usage, 0), m.overridden
    FROM ver, plan
    LEFT JOIN merged m ON true
    LEFT JOIN entitlement_usage u ON u.organization_id = p_org AND u.feature = m.feature
   ORDER BY m.position, m.feature
$$;

-- After a catalog edit (ops): the organizations whose features come from a scope, ids
-- only, a page at a time (like due_stripe_events, it reads across organizations).
CREATE FUNCTION entitlement_scope_organizations(p_scope text, p_after uuid, p_limit integer)
RETURNS TABLE (id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
  SELECT o.id FROM organizations o
   WHERE (p_after IS NULL OR o.id > p_after)
     AND coalesce((SELECT s.plan_id FROM billing_subscriptions s
                    WHERE s.organization_id = o.id AND s.plan_id IS NOT NULL
                      AND s.status IN ('active', 'trialing', 'past_due')
                    ORDER BY s.created_at DESC, s.id DESC LIMIT 1), 'free') = p_scope
   ORDER BY o.id
   LIMIT least(greatest(p_limit, 0), 1000)
$$;

ALTER TABLE organization_entitlements ENABLE ROW LEVEL SECURITY;
ALTER TABLE organization_entitlements FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON organization_entitlements USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
ALTER TABLE entitlement_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE entitlement_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON entitlement_usage USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
ALTER TABLE entitlement_usage_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE entitlement_usage_changes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON entitlement_usage_changes USING (organization_id = current_org())
  WITH CHECK (organization_id = current_org());
ALTER TABLE entitlement_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE entitlement_versions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON entitlement_versions USING (organization_id = current_org());

-- The catalog is edited by ops (the CLI connects as the application role); the API
-- has no door to it.
GRANT SELECT, INSERT, UPDATE, DELETE ON entitlement_features TO credits_app;
GRANT SELECT ON entitlement_catalog_version TO credits_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON organization_entitlements TO credits_app;
GRANT SELECT, INSERT, UPDATE ON entitlement_usage TO credits_app;
GRANT SELECT, INSERT ON entitlement_usage_changes TO credits_app;
GRANT USAGE ON SEQUENCE entitlement_usage_changes_id_seq TO credits_app;
GRANT SELECT ON entitlement_versions TO credits_app;
REVOKE ALL ON FUNCTION bump_entitlements(), bump_entitlement_catalog(), entitlement_plan(uuid),
  effective_entitlements(uuid), entitlement_scope_organizations(text, uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION entitlement_plan(uuid), effective_entitlements(uuid),
  entitlement_scope_organizations(text, uuid, integer) TO credits_app;
