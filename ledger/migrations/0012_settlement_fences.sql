-- Settlers that share the partitions, and fence (issue 12). A settler that took a
-- partition's lease got a new epoch for it (a counter in Redis, beside the lease);
-- every settlement transaction of the partition first moves the fence to its epoch,
-- and is refused when the fence is already further: an owner that lost its lease (it
-- was paused, its lease ran out, another took over) can never commit again. The fence
-- row is locked for the transaction, so two owners never settle a partition at once.
CREATE TABLE settlement_fences (
  partition integer PRIMARY KEY,
  epoch bigint NOT NULL
);
GRANT SELECT, INSERT, UPDATE ON settlement_fences TO credits_settler;

-- A paused owner holding its transaction open must not stall its successor for long:
-- a lock waited on more than 3 s fails the waiting statement (the successor retries),
-- and a session idle inside a transaction for 5 s is ended by the server (its locks go
-- with it, and its commit never comes). Settlement transactions send their statements
-- back to back, so neither limit is near in normal work.
ALTER ROLE credits_settler SET lock_timeout = '3s';
ALTER ROLE credits_settler SET idle_in_transaction_session_timeout = '5s';
