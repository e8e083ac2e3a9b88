-- The W3C trace context (traceparent, tracestate) of the event a violation names as its
-- evidence, when that event's message carried one; the relay publishes it as the
-- violation message's headers (docs/operations.md, "Traces"). NULL: none. Nullable
-- columns without a default: adding them rewrites nothing.
ALTER TABLE tally.violations ADD COLUMN traceparent text, ADD COLUMN tracestate text;
