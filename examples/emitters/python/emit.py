#!/usr/bin/env python3
"""Example emitter for tally's three input contracts (docs/emitters.md).

Sends one valid event of each stream -- llm.usage.v1, policy.decision.v1 (plus one
Open Policy Agent decision-log event), audit.event.v1 -- in JSON and in Avro
single-object encoding, keyed by tenant id. Python standard library only: the Avro
binary encoding, the schema's Parsing Canonical Form and its CRC-64-AVRO fingerprint
are written out below from the Avro specification; the schemas are read from
schemas/avro/<subject>/v<N>.avsc (the highest N is current).

Kafka: messages are produced with `kcat` (Debian/Ubuntu package `kcat`; each payload
is written to a file and sent as one message, so binary payloads are safe). With
`--out DIR` nothing is sent: the payloads are written to DIR with a manifest.json
(topic, key, file per message) for any other producer.

    python3 examples/emitters/python/emit.py --brokers 127.0.0.1:9092
    python3 examples/emitters/python/emit.py --out /tmp/payloads

Prints one JSON line per message: topic, key, encoding, id (event_id or decision_id).
"""

import argparse
import datetime
import decimal
import json
import os
import struct
import subprocess
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMAS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "schemas", "avro"))

# ---------------------------------------------------------------------------
# Schemas, Parsing Canonical Form, fingerprint


def load_schema(schemas_dir, subject):
    """The current (highest-numbered) schema of `subject`, parsed."""
    d = os.path.join(schemas_dir, subject)
    versions = [f for f in os.listdir(d) if f.startswith("v") and f.endswith(".avsc")]
    if not versions:
        raise SystemExit(f"no schema files in {d}")
    latest = max(versions, key=lambda f: int(f[1:-5]))
    with open(os.path.join(d, latest), encoding="utf-8") as f:
        return json.load(f)


PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
PCF_KEYS = ("name", "type", "fields", "symbols", "items", "values", "size")


def _fullname(name, namespace):
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _pcf(schema, namespace):
    """Parsing Canonical Form (Avro specification, "Transforming into Parsing
    Canonical Form"): full names, only the attributes in PCF_KEYS in that order,
    primitives as bare strings, no whitespace."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return json.dumps(schema)
        return json.dumps(_fullname(schema, namespace), ensure_ascii=False)
    if isinstance(schema, list):
        return "[" + ",".join(_pcf(s, namespace) for s in schema) + "]"
    t = schema["type"]
    if t in PRIMITIVES or (isinstance(t, str) and t not in ("record", "enum", "fixed", "array", "map")):
        # {"type": "long", "logicalType": ...} is just "long".
        return _pcf(t, namespace)
    parts = []
    if t in ("record", "enum", "fixed"):
        name = _fullname(schema["name"], schema.get("namespace", namespace))
        namespace = name.rsplit(".", 1)[0] if "." in name else ""
        parts.append('"name":' + json.dumps(name, ensure_ascii=False))
    parts.append('"type":' + json.dumps(t))
    if t == "record":
        fields = []
        for f in schema["fields"]:
            fields.append(
                '{"name":' + json.dumps(f["name"], ensure_ascii=False)
                + ',"type":' + _pcf(f["type"], namespace) + "}"
            )
        parts.append('"fields":[' + ",".join(fields) + "]")
    if t == "enum":
        parts.append('"symbols":' + json.dumps(schema["symbols"], ensure_ascii=False, separators=(",", ":")))
    if t == "array":
        parts.append('"items":' + _pcf(schema["items"], namespace))
    if t == "map":
        parts.append('"values":' + _pcf(schema["values"], namespace))
    if t == "fixed":
        parts.append('"size":' + str(int(schema["size"])))
    return "{" + ",".join(parts) + "}"


def parsing_canonical_form(schema):
    return _pcf(schema, "")


CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp & 0xFFFFFFFFFFFFFFFF)
    return table


_TABLE = _crc64_table()


def crc64_avro(data):
    """CRC-64-AVRO ("Rabin") fingerprint of `data` (Avro specification)."""
    fp = CRC64_EMPTY
    for b in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ b) & 0xFF]
    return fp


def fingerprint(schema):
    return crc64_avro(parsing_canonical_form(schema).encode("utf-8"))


# ---------------------------------------------------------------------------
# Avro binary encoding


def _long(n):
    """Zig-zag varint."""
    z = (n << 1) ^ (n >> 63)
    z &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _bytes(b):
    return _long(len(b)) + b


def _decimal_bytes(value, scale):
    """Two's-complement big-endian bytes of the unscaled integer (minimal length)."""
    unscaled = int(decimal.Decimal(value).scaleb(scale).to_integral_exact())
    length = max(1, (unscaled.bit_length() + 8) // 8)
    return unscaled.to_bytes(length, "big", signed=True)


def _micros(ts):
    dt = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    delta = dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode(schema, value):
    """Avro binary encoding of `value` (the JSON-shaped event) under `schema`."""
    if isinstance(schema, list):  # union: ["null", T] only
        if value is None:
            return _long(schema.index("null"))
        i = next(i for i, s in enumerate(schema) if s != "null")
        return _long(i) + encode(schema[i], value)
    if isinstance(schema, str):
        schema = {"type": schema}
    t, logical = schema["type"], schema.get("logicalType")
    if t == "record":
        return b"".join(encode(f["type"], value.get(f["name"], f.get("default"))) for f in schema["fields"])
    if t == "enum":
        return _long(schema["symbols"].index(value))
    if t == "array":
        return (_long(len(value)) + b"".join(encode(schema["items"], v) for v in value) if value else b"") + _long(0)
    if t == "map":
        body = b"".join(_bytes(k.encode()) + encode(schema["values"], v) for k, v in value.items())
        return (_long(len(value)) + body if value else b"") + _long(0)
    if t == "long" and logical == "timestamp-micros":
        return _long(_micros(value))
    if t == "bytes" and logical == "decimal":
        return _bytes(_decimal_bytes(value, schema["scale"]))
    if t in ("long", "int"):
        return _long(value)
    if t == "boolean":
        return b"\x01" if value else b"\x00"
    if t == "string":
        return _bytes(value.encode("utf-8"))
    if t == "null":
        return b""
    raise ValueError(f"type {t} not supported by this example")


def single_object(schema, value):
    """Avro single-object encoding: C3 01, the 8-byte little-endian fingerprint of the
    schema's Parsing Canonical Form, then the datum."""
    return b"\xc3\x01" + struct.pack("<Q", fingerprint(schema)) + encode(schema, value)


# ---------------------------------------------------------------------------
# The events


def now():
    """UTC, microsecond precision: the same instant in JSON and Avro."""
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def usage_event(tenant, encoding):
    return {
        "event_id": str(uuid.uuid4()),
        "occurred_at": now(),
        "tenant_id": tenant,
        "team_id": "team-search",
        "project_id": None,
        "user_id": None,
        "source": "example-gateway",
        "tags": {"emitter": f"python-{encoding}"},
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 1200,
        "cached_input_tokens": 300,
        "cache_write_tokens": 0,
        "output_tokens": 450,
        "reasoning_tokens": 0,
        "latency_ms": 812,
        "status": "success",
        "reported_cost": "0.000495",  # a decimal string, never a float
        "currency": "USD",
        "region": "eu-west-1",
    }


def policy_decision(tenant, encoding):
    decision_id = f"dec-{uuid.uuid4()}"
    return {
        # Any UUID; the dedup key of a decision is (tenant_id, decision_id).
        "event_id": str(uuid.uuid4()),
        "occurred_at": now(),
        "tenant_id": tenant,
        "team_id": None,
        "project_id": "proj-42",
        "user_id": None,
        "source": "example-policy-engine",
        "tags": {"emitter": f"python-{encoding}"},
        "decision_id": decision_id,
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "policy_id": "pii-redaction",
        "policy_version": "3",
        "decision": "allow",
        "enforcement": "enforce",
        "severity": "low",
        "rule_ids": ["email"],
        "reason": "no personal data found",
        "evaluation_ms": 3,
    }


def opa_decision_log(tenant):
    """An OPA decision-log event as OPA's decision_logs plugin uploads it (one event
    of the JSON array; tally takes one event per message)."""
    return {
        "decision_id": f"opa-{uuid.uuid4()}",
        "labels": {"id": "opa-example-1", "version": "0.70.0"},
        "path": "llm/guard/allow",
        "input": {"tenant_id": tenant, "request_id": f"req-{uuid.uuid4().hex[:12]}", "prompt": "never stored"},
        "result": {"allow": True, "severity": "low", "reason": "ok"},
        "bundles": {"llm": {"revision": "r42"}},
        "timestamp": now(),
        "metrics": {"timer_server_handler_ns": 2_500_000},
    }


def audit_event(tenant, encoding):
    return {
        "event_id": str(uuid.uuid4()),
        "occurred_at": now(),
        "tenant_id": tenant,
        "team_id": "team-search",
        "project_id": None,
        "user_id": None,
        "source": "example-admin-api",
        "tags": {"emitter": f"python-{encoding}"},
        "actor_type": "service",
        "actor_id": "svc-billing",
        "action": "budget.update",
        "resource_type": "budget",
        "resource_id": "budget-9",
        "outcome": "success",
        "ip": "192.0.2.10",
        "user_agent": "example-emitter/1.0",
        "details": json.dumps({"old": "100", "new": "250"}),  # JSON text in a string
        "personal_data": False,
    }


def messages(args):
    """(topic, key, encoding, id, payload) of every message to send."""
    out = []
    streams = [
        (args.usage_topic, "llm.usage.v1", usage_event, "event_id"),
        (args.policy_topic, "policy.decision.v1", policy_decision, "decision_id"),
        (args.audit_topic, "audit.event.v1", audit_event, "event_id"),
    ]
    for topic, subject, make, id_field in streams:
        schema = load_schema(args.schemas, subject)
        if args.encoding in ("json", "both"):
            e = make(args.tenant, "json")
            body = json.dumps(e, separators=(",", ":")).encode("utf-8")
            out.append((topic, args.tenant, "json", e[id_field], body))
        if args.encoding in ("avro", "both"):
            e = make(args.tenant, "avro")
            out.append((topic, args.tenant, "avro-single-object", e[id_field], single_object(schema, e)))
    if not args.no_opa:
        e = opa_decision_log(args.tenant)
        body = json.dumps(e, separators=(",", ":")).encode("utf-8")
        out.append((args.policy_topic, args.tenant, "opa-decision-log", e["decision_id"], body))
    return out


def send_kcat(brokers, topic, key, payload):
    """One message via kcat; raises on failure (kcat exits non-zero or reports it)."""
    with tempfile.NamedTemporaryFile(prefix="tally-emit-", suffix=".bin", delete=False) as f:
        f.write(payload)
        path = f.name
    try:
        r = subprocess.run(
            ["kcat", "-P", "-b", brokers, "-t", topic, "-k", key, "-X", "acks=all", path],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        os.unlink(path)
    if r.returncode != 0 or "fail" in r.stderr.lower():
        raise SystemExit(f"kcat failed for {topic} (exit {r.returncode}): {r.stderr.strip()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default=os.environ.get("TALLY__KAFKA__BROKERS", "127.0.0.1:9092"))
    p.add_argument("--usage-topic", default=os.environ.get("TALLY__KAFKA__USAGE_TOPIC", "llm.usage.v1"))
    p.add_argument("--policy-topic", default=os.environ.get("TALLY__POLICY__TOPIC", "policy.decision.v1"))
    p.add_argument("--audit-topic", default=os.environ.get("TALLY__AUDIT__TOPIC", "audit.event.v1"))
    p.add_argument("--tenant", default="tenant-acme")
    p.add_argument("--encoding", choices=("json", "avro", "both"), default="both")
    p.add_argument("--no-opa", action="store_true", help="no OPA decision-log event")
    p.add_argument("--schemas", default=DEFAULT_SCHEMAS, help="directory of <subject>/v<N>.avsc")
    p.add_argument("--out", help="write payloads and manifest.json here instead of sending")
    p.add_argument("--print-fingerprints", action="store_true",
                   help="print each subject's fingerprint and Parsing Canonical Form, then exit")
    args = p.parse_args(argv)

    if args.print_fingerprints:
        for subject in ("llm.usage.v1", "policy.decision.v1", "audit.event.v1", "compliance.violation.v1"):
            s = load_schema(args.schemas, subject)
            print(json.dumps({"subject": subject, "fingerprint": f"{fingerprint(s):016x}",
                              "canonical_form": parsing_canonical_form(s)}))
        return 0

    msgs = messages(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        manifest = []
        for n, (topic, key, enc, ident, payload) in enumerate(msgs):
            name = f"{n:02d}-{enc}.bin"
            with open(os.path.join(args.out, name), "wb") as f:
                f.write(payload)
            manifest.append({"topic": topic, "key": key, "encoding": enc, "id": ident, "file": name})
        with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    else:
        for topic, key, _, _, payload in msgs:
            send_kcat(args.brokers, topic, key, payload)
    for topic, key, enc, ident, _ in msgs:
        print(json.dumps({"topic": topic, "key": key, "encoding": enc, "id": ident}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
