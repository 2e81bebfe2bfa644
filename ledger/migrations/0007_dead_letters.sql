-- Quarantine for usage-stream entries that cannot be settled (issue 8): one bad entry
-- must never stop its partition. The settler isolates it (settling the rest of its
-- batch in order around it) and keeps it here with the error:
--   cleaned   its charges are in the ledger with the offending text replaced (metadata
--             emptied, names stripped of what Postgres refuses); `raw` is the original;
--   held      it could not be settled even cleaned: the ledger does not hold it, so
--             reconciliation counts `amount` (its balance change) as in flight and a
--             cold-cache load replays it, until ops replay it (after a fix) or discard it;
--   replayed  a held entry settled later by ops; discarded: ops decided it never happened.

CREATE TABLE settlement_dead_letters (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  partition integer NOT NULL,
  entry_id text NOT NULL,                                 -- the stream entry (ms-seq)
  organization_id uuid,                                   -- NULL when the entry named none
  raw bytea NOT NULL,                                     -- the entry's event, as the stream held it (msgpack)
  error text NOT NULL,
  state text NOT NULL CHECK (state IN ('cleaned', 'held', 'replayed', 'discarded')),
  amount bigint NOT NULL DEFAULT 0,                       -- its balance change (millicredits, <= 0)
  created_at timestamptz NOT NULL DEFAULT now(),
  resolved_at timestamptz,
  resolved_by text NOT NULL DEFAULT '',
  resolution text NOT NULL DEFAULT '',
  UNIQUE (partition, entry_id)
);
CREATE INDEX settlement_dead_letters_held ON settlement_dead_letters (organization_id) WHERE state = 'held';

ALTER TABLE settlement_dead_letters ENABLE ROW LEVEL SECURITY;
ALTER TABLE settlement_dead_letters FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON settlement_dead_letters USING (organization_id = current_org());
CREATE POLICY settler ON settlement_dead_letters TO credits_settler USING (true) WITH CHECK (true);
GRANT SELECT ON settlement_dead_letters TO credits_app;  -- a cold load replays its organization's held entries
GRANT SELECT, INSERT, UPDATE ON settlement_dead_letters TO credits_settler;
