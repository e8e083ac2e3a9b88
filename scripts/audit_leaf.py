#!/usr/bin/env python3
"""Recompute tally audit-log leaf hashes and tree roots from stored rows.

Independent of tally: written from docs/audit-log.md ("Leaf encoding") alone, with
the Python standard library only.

Input: one JSON object per line (ClickHouse `FORMAT JSONEachRow`) with the columns
listed in LEAF_FIELDS, for one tenant, in any order. Output: one line per row,
"<leaf_index> <leaf hash hex>", then "root <size> <base64 root>" (RFC 6962 tree head
over the rows sorted by leaf_index). With --bytes, the leaf bytes in hex are printed
too. With --no-tree, rows are hashed one by one (any leaf_index) and no root is
computed (for single rows, like the worked example). With --checkpoint FILE, the root is compared with the checkpoint's third line
(the signature is not checked here: that needs an Ed25519 library).

    clickhouse-client -q "SELECT * FROM tally.audit_events WHERE tenant_id = 'acme'
        FORMAT JSONEachRow" | python3 scripts/audit_leaf.py
"""
import base64
import hashlib
import json
import struct
import sys
import uuid

STRING_FIELDS = [
    "team_id", "project_id", "user_id", "source", "actor_type", "actor_id", "action",
    "resource_type", "resource_id", "outcome", "ip", "user_agent", "details",
]


def s(value):
    b = value.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def leaf_bytes(row):
    out = b"\x01"                                            # format version 1
    out += s(row["tenant_id"])
    out += struct.pack(">Q", int(row["leaf_index"]))
    out += uuid.UUID(row["event_id"]).bytes                  # 16 bytes, RFC 4122 order
    out += struct.pack(">q", int(row["occurred_at_us"]))
    for f in STRING_FIELDS:
        out += s(row.get(f) or "")                           # absent = empty string
    out += bytes([1 if row["personal_data"] in (1, True, "1", "true") else 0])
    out += struct.pack(">I", int(row["pseudonym_key_version"]))
    return out


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def mth(hashes):
    """RFC 6962 Merkle Tree Hash over leaf hashes."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(hashes[:k]) + mth(hashes[k:])).digest()


def main(argv):
    show_bytes = "--bytes" in argv
    no_tree = "--no-tree" in argv
    checkpoint = argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else None
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    rows.sort(key=lambda r: int(r["leaf_index"]))
    hashes = []
    for i, row in enumerate(rows):
        if no_tree:
            data = leaf_bytes(row)
            print(f"{row['leaf_index']} bytes {data.hex()}")
            print(f"{row['leaf_index']} {leaf_hash(data).hex()}")
            continue
        if int(row["leaf_index"]) != i:
            print(f"first bad leaf index {i}: row has leaf_index {row['leaf_index']}")
            return 2
        data = leaf_bytes(row)
        hashes.append(leaf_hash(data))
        if show_bytes:
            print(f"{i} bytes {data.hex()}")
        print(f"{i} {hashes[-1].hex()}")
    if no_tree:
        return 0
    root = base64.b64encode(mth(hashes)).decode()
    print(f"root {len(hashes)} {root}")
    if checkpoint:
        lines = open(checkpoint, encoding="utf-8").read().split("\n")
        size, want = int(lines[1]), lines[2]
        got = base64.b64encode(mth(hashes[:size])).decode()
        print("checkpoint", "matches" if got == want else f"MISMATCH (signed {want})")
        return 0 if got == want and size <= len(hashes) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
