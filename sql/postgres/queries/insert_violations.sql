-- Puts violations into the outbox; a deterministic id already present is a no-op.
-- traceparent/tracestate: the W3C trace context of the event named as evidence (NULL: none).
-- Returns the rule of each violation inserted (for tally_violations_raised_total).
INSERT INTO tally.violations
    (violation_id, rule, severity, tenant_id, subject_type, subject_id, window_start, window_end,
     observed, threshold, evidence_event_ids, detected_at, message, traceparent, tracestate)
SELECT u.id, u.rule, u.sev, u.tenant, u.st, u.sid, u.ws, u.we, u.obs, u.thr,
       string_to_array(u.ev, ','), u.det, u.msg, u.tp, u.ts
FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
            $8::timestamptz[], $9::numeric[], $10::numeric[], $11::text[], $12::timestamptz[], $13::text[],
            $14::text[], $15::text[])
     AS u(id, rule, sev, tenant, st, sid, ws, we, obs, thr, ev, det, msg, tp, ts)
ON CONFLICT (violation_id) DO NOTHING
RETURNING rule
