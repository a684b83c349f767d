-- The credit lifecycle (periods that turn, grants that expire, subscription statuses).

-- Past due: an active subscription whose payment is overdue since this time; still
-- served until billing.past_due_grace_hours after it, then suspended by the billing run.
-- A column, not a label of subscription_status: the data model's enums are fixed.
ALTER TABLE subscriptions ADD COLUMN past_due_since timestamptz;

-- Users whose credits rows or subscription status changed in PostgreSQL and whose live
-- balance in Redis has not yet been brought in line. A row is written in the same
-- transaction as the change and deleted once Redis has it (lifecycle::apply_queued),
-- so a crash between the commit and the Redis step leaves the work queued, not lost.
CREATE TABLE ledger_rebase_queue (
    user_id   uuid        PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- The billing run's scan: current rows whose period has ended.
CREATE INDEX credits_current_period_end_idx ON credits (billing_period_end) WHERE is_current;
