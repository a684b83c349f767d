-- A downgrade waits for the end of the current period (`tollgate subscriptions set`):
-- the tier it takes then. The billing run's renewal switches the subscription to it
-- (with that tier's plan from [tiers]) before allocating the new period, and clears
-- it; an upgrade, a same-tier `set` or a cancellation clears it too.
ALTER TABLE subscriptions ADD COLUMN scheduled_tier subscription_tier;
