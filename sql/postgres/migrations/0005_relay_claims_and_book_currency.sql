-- 1. Outbox claims. A relay attempt claims the rows it will send (attempt_id,
-- taken with FOR UPDATE SKIP LOCKED), so two relays never send the same row.
-- An attempt enqueues its sends only until enqueue_until; after settle_after
-- every send it made has been delivered or has failed for good, and only then
-- may another relay read the topic to settle it.
ALTER TABLE tally.violations ADD COLUMN attempt_id bigint;
CREATE INDEX violations_claimed ON tally.violations (attempt_id)
    WHERE published_at IS NULL AND attempt_id IS NOT NULL;

ALTER TABLE tally.relay_attempts
    ADD COLUMN owner text NOT NULL DEFAULT '',
    ADD COLUMN enqueue_until timestamptz NOT NULL DEFAULT now(),
    -- unknown writers get a conservative delivery window
    ADD COLUMN settle_after timestamptz NOT NULL DEFAULT now() + interval '1 minute';

-- Attempts left by an older relay: claim their rows, and wait out that relay's
-- delivery timeout (30 s, 60 s wait) counted from when it recorded the attempt.
UPDATE tally.relay_attempts
   SET enqueue_until = created_at + interval '60 seconds',
       settle_after = created_at + interval '100 seconds';
UPDATE tally.violations v SET attempt_id = a.attempt_id
  FROM tally.relay_attempts a
 WHERE v.violation_id = ANY (a.violation_ids) AND v.published_at IS NULL;

-- 2. One book currency per deployment. Every price is in it, so every cost,
-- spend total, rollup and budget is in it; nothing adds two currencies.
CREATE TABLE tally.price_book (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    currency  char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$')
);

DO $$
DECLARE
    found text;
BEGIN
    SELECT string_agg(DISTINCT currency, ', ' ORDER BY currency) INTO found FROM tally.prices;
    IF (SELECT count(DISTINCT currency) FROM tally.prices) > 1 THEN
        RAISE EXCEPTION 'tally.prices holds prices in several currencies (%)', found
            USING HINT = 'tally prices everything in one book currency: convert or delete the other rows, then migrate again';
    END IF;
END
$$;

INSERT INTO tally.price_book (currency)
SELECT coalesce((SELECT min(currency) FROM tally.prices), 'USD');

-- A price row in another currency is rejected, naming the row.
CREATE FUNCTION tally.price_in_book_currency() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    book char(3);
BEGIN
    SELECT currency INTO book FROM tally.price_book FOR SHARE;
    IF NEW.currency IS DISTINCT FROM book THEN
        RAISE EXCEPTION 'price row (provider %, model %, effective_from %) is in % but the price book''s currency is %',
            NEW.provider, NEW.model, NEW.effective_from, NEW.currency, book
            USING ERRCODE = 'check_violation',
                  HINT = 'tally prices everything in one book currency (tally.price_book); convert the price';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER prices_in_book_currency BEFORE INSERT OR UPDATE ON tally.prices
    FOR EACH ROW EXECUTE FUNCTION tally.price_in_book_currency();

-- The book currency changes only while there are no prices, and never goes away.
CREATE FUNCTION tally.price_book_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'INSERT' THEN
        RAISE EXCEPTION 'tally.price_book holds exactly one row'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.currency IS DISTINCT FROM OLD.currency AND EXISTS (SELECT 1 FROM tally.prices) THEN
        RAISE EXCEPTION 'the price book currency stays % while tally.prices has rows', OLD.currency
            USING ERRCODE = 'check_violation',
                  HINT = 'delete (or convert) every price first: a change of book currency would change the meaning of every total';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER price_book_guard BEFORE INSERT OR UPDATE OR DELETE ON tally.price_book
    FOR EACH ROW EXECUTE FUNCTION tally.price_book_guard();
