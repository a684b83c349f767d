-- Partition upkeep that survives rows in the DEFAULT partition.
--
-- `CREATE TABLE ... PARTITION OF usage_history` refuses a month while the DEFAULT
-- partition holds a row of that month (a usage row from a skewed clock, or written
-- while upkeep was behind), and the version of 0001 then failed for that month and
-- every later one, forever. This version moves such rows into the month's new
-- partition in the same transaction, and refuses (instead of skipping) a table that
-- has a partition's name but is not one.
--
-- How a missing month is created, under an exclusive lock on usage_history:
--   1. the month's rows are deleted from DEFAULT into a temporary table,
--   2. the partition is created exactly as the others are (PARTITION OF: the same
--      columns, primary key (id, created_at), indexes and foreign keys),
--   3. the rows are inserted back through usage_history, which routes them into it;
--      the counts moved out and in must agree, or everything rolls back.
-- (Creating a standalone table, filling it and ATTACHing it would avoid copying the
-- rows twice, but yields a partition whose constraints are its own rather than
-- inherited, unlike every other one; DEFAULT holds few rows, so copying is cheap.)
--
-- Concurrency: a transaction-level advisory lock serialises upkeep runs (several
-- gateways run it hourly), so two never race to create the same month. The lock on
-- usage_history (taken before DEFAULT, the order inserts take them) is ACCESS
-- EXCLUSIVE, which CREATE TABLE ... PARTITION OF takes anyway: the flusher's inserts
-- wait until the commit and are then routed with the new partition in place, so
-- none can land in DEFAULT between the move and the creation. The lock is taken only
-- when a month is missing; otherwise upkeep only reads the catalog.
CREATE OR REPLACE FUNCTION tollgate_ensure_usage_partitions(from_ts timestamptz, months_ahead integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    first_month date := date_trunc('month', from_ts AT TIME ZONE 'UTC')::date;
    m date;
    lo timestamptz;
    hi timestamptz;
    part text;
    rel regclass;
    cols text;
    moved_out bigint;
    moved_in bigint;
    created integer := 0;
BEGIN
    -- 'tollpart': one upkeep at a time in this database.
    PERFORM pg_advisory_xact_lock(8390043843812225652);
    FOR i IN 0..months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        lo := m::timestamp AT TIME ZONE 'UTC';
        hi := (m + interval '1 month')::timestamp AT TIME ZONE 'UTC';
        part := format('usage_history_%s', to_char(m, 'YYYY_MM'));
        rel := to_regclass(part);
        IF rel IS NOT NULL THEN
            IF NOT EXISTS (SELECT 1 FROM pg_inherits
                            WHERE inhrelid = rel AND inhparent = 'usage_history'::regclass) THEN
                RAISE EXCEPTION 'table % exists but is not a partition of usage_history', part
                    USING ERRCODE = 'duplicate_table',
                          HINT = 'rename or drop it, then partition upkeep creates the month';
            END IF;
            CONTINUE;
        END IF;

        LOCK TABLE ONLY usage_history IN ACCESS EXCLUSIVE MODE;
        LOCK TABLE usage_history_default IN ACCESS EXCLUSIVE MODE;
        -- Columns by name, so the copy does not depend on their order. Dynamic SQL
        -- throughout: the temporary table is new in every call, so no plan may be
        -- cached against it.
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
          FROM pg_attribute
         WHERE attrelid = 'usage_history'::regclass AND attnum > 0 AND NOT attisdropped;
        EXECUTE format(
            'CREATE TEMPORARY TABLE tollgate_moving_usage ON COMMIT DROP AS
             WITH moved AS (
                 DELETE FROM usage_history_default
                  WHERE created_at >= $1 AND created_at < $2
                 RETURNING %s)
             SELECT * FROM moved', cols)
            USING lo, hi;
        GET DIAGNOSTICS moved_out = ROW_COUNT;
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_history FOR VALUES FROM (%L) TO (%L)',
            part, lo, hi);
        EXECUTE format(
            'INSERT INTO usage_history (%s) SELECT %s FROM pg_temp.tollgate_moving_usage',
            cols, cols);
        GET DIAGNOSTICS moved_in = ROW_COUNT;
        EXECUTE 'DROP TABLE pg_temp.tollgate_moving_usage';
        IF moved_in <> moved_out THEN
            RAISE EXCEPTION 'moving rows of % out of usage_history_default: % out, % in',
                part, moved_out, moved_in;
        END IF;
        IF moved_out > 0 THEN
            RAISE LOG 'tollgate: moved % usage_history row(s) from the default partition into %',
                moved_out, part;
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END;
$$;
