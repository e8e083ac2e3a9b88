#!/usr/bin/env python3
"""Check that tally's ClickHouse SQL also runs on current ClickHouse.

Tests and the demo run against Debian's clickhouse-server 18.16; production may run a current
ClickHouse. This runs the same SQL in-process on chDB (PyPI `chdb-core`, a current engine):

  1. every sql/clickhouse/*.sql file in name order (DDL; split into statements on `;` at line end),
  2. every sql/clickhouse/queries/*.sql file (analyst queries, one statement each) against the
     tables and views just created, in the database `tally` (the queries name no database:
     they run in clickhouse.database, as `tally migrate` installs the views there).

Prints one line per file, then `chdb dialect: N passed, M failed`; exits 1 on any failure.

Usage: check_dialect.py [SQL_DIR]   (default: <repo>/sql/clickhouse)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SQL_DIR = REPO / "sql" / "clickhouse"


def import_chdb():
    try:
        import chdb  # noqa: F401
    except ImportError:
        print("chdb not installed; running: python3 -m pip install -q chdb-core", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "chdb-core"], check=True)
        import importlib

        importlib.invalidate_caches()
    from chdb import session

    return session


def is_blank_or_comment(text: str) -> bool:
    """True if text holds no SQL: only whitespace, `--` line comments and `/* */` blocks."""
    rest = text
    while True:
        rest = rest.lstrip()
        if not rest:
            return True
        if rest.startswith("--"):
            nl = rest.find("\n")
            if nl < 0:
                return True
            rest = rest[nl + 1 :]
        elif rest.startswith("/*"):
            end = rest.find("*/")
            if end < 0:
                return True
            rest = rest[end + 2 :]
        else:
            return False


def split_statements(sql: str) -> list[str]:
    """Split on `;` at the end of a line (a `--` comment line never ends a statement)."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        current.append(line)
        stripped = line.rstrip()
        if stripped.endswith(";") and not stripped.lstrip().startswith("--"):
            statements.append("\n".join(current))
            current = []
    if current:
        statements.append("\n".join(current))
    out = []
    for stmt in statements:
        if is_blank_or_comment(stmt):
            continue
        stmt = stmt.strip()
        while stmt.endswith(";"):
            stmt = stmt[:-1].rstrip()
        out.append(stmt)
    return out


def first_line(stmt: str) -> str:
    for line in stmt.splitlines():
        line = line.strip()
        if line and not line.startswith("--"):
            return line[:80]
    return stmt[:80]


def short_error(exc: Exception) -> str:
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= 400 else msg[:400] + " ..."


def run_file(sess, path: Path, *, single: bool) -> tuple[bool, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return False, f"cannot read: {exc}"
    statements = split_statements(text)
    if not statements:
        return False, "no SQL statement found"
    if single and len(statements) != 1:
        return False, f"expected one statement, found {len(statements)}"
    for i, stmt in enumerate(statements, 1):
        try:
            sess.query(stmt, "TabSeparated")
        except Exception as exc:  # chdb raises ChdbError (a RuntimeError) on SQL errors
            return False, f"statement {i} ({first_line(stmt)!r}): {short_error(exc)}"
    n = len(statements)
    return True, f"{n} statement{'s' if n != 1 else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sql_dir", nargs="?", type=Path, default=DEFAULT_SQL_DIR)
    args = parser.parse_args()
    sql_dir: Path = args.sql_dir

    ddl_files = sorted(p for p in sql_dir.glob("*.sql") if p.is_file())
    query_files = sorted(p for p in (sql_dir / "queries").glob("*.sql") if p.is_file())
    if not ddl_files:
        print(f"no *.sql files in {sql_dir}")
        print("chdb dialect: 0 passed, 1 failed")
        return 1

    session = import_chdb()
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="tally-chdb-") as tmp:
        sess = session.Session(str(Path(tmp) / "db"))
        try:
            version = sess.query("SELECT version()", "TabSeparated").data().strip()
            print(f"chDB engine {version}; SQL from {sql_dir}")
            for path, single in [(p, False) for p in ddl_files] + [(p, True) for p in query_files]:
                if single:
                    sess.query("USE tally", "TabSeparated")
                ok, detail = run_file(sess, path, single=single)
                rel = path.relative_to(sql_dir)
                if ok:
                    passed += 1
                    print(f"ok    {rel} ({detail})")
                else:
                    failed += 1
                    print(f"FAIL  {rel}: {detail}")
        finally:
            sess.close()

    print(f"chdb dialect: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
