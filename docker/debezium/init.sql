-- Example source table of the Debezium connector (docker/debezium/postgres-connector.json).
-- REPLICA IDENTITY FULL: updates and deletes carry the whole old row in "before".
CREATE TABLE IF NOT EXISTS public.orders (
    id bigint PRIMARY KEY,
    user_id text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.orders REPLICA IDENTITY FULL;
