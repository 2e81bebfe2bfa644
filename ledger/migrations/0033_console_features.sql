-- The ops console reads what issue 13's features keep per organization: automatic
-- top-up settings and attempts (a failed card shows on the organization's page),
-- entitlement overrides and usage, department budget alerts. Read policies of its own,
-- as 0020 gives it on every other tenant table; no write privilege.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['auto_topup_settings', 'auto_topup_attempts', 'organization_entitlements',
    'entitlement_usage', 'department_budget_alerts'] LOOP
    EXECUTE format('CREATE POLICY console ON %I FOR SELECT TO credits_console USING (true)', t);
    EXECUTE format('GRANT SELECT ON %I TO credits_console', t);
  END LOOP;
END $$;
