#!/usr/bin/env bash
# Validate the deploy/ files as far as this machine allows (no Docker engine, no cluster):
#   - every YAML file parses (PyYAML);
#   - docker-compose.yml: `docker compose config -q` if the compose plugin exists
#     (else `docker-compose config -q` if that exists, else skipped with a message);
#   - k8s: every document has apiVersion, kind and metadata.name;
#   - the tally settings used (k8s ConfigMap tally.toml, TALLY__SECTION__KEY variables in compose
#     and k8s) name keys that exist in consumers/src/config.defaults.toml (unknown keys are
#     fatal at tally start-up);
#   - the Dockerfile has the expected stages, ENTRYPOINT and CMD.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail=0
ok() { printf 'ok    %s\n' "$*"; }
bad() { printf 'FAIL  %s\n' "$*"; fail=1; }
skip() { printf 'skip  %s\n' "$*"; }

if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "PyYAML missing; running: python3 -m pip install -q pyyaml"
  python3 -m pip install -q pyyaml
fi

# ---- YAML, k8s shape, tally config keys (one Python pass) ----------------------------------
if python3 - <<'PY'; then ok "YAML/k8s/config-key checks"; else bad "YAML/k8s/config-key checks"; fi
import glob, os, re, sys
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

failed = False

def report(ok, what):
    global failed
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failed = True

defaults_path = "consumers/src/config.defaults.toml"
defaults = None
if tomllib and os.path.exists(defaults_path):
    with open(defaults_path, "rb") as f:
        defaults = tomllib.load(f)
else:
    print(f"  skip  config-key checks ({defaults_path} missing or no tomllib)")

def key_known(section, key):
    return defaults is None or (section in defaults and isinstance(defaults[section], dict) and key in defaults[section])

def check_env_name(name, where):
    m = re.fullmatch(r"TALLY__([A-Z0-9_]+?)__([A-Z0-9_]+)", name)
    if not m:
        return
    section, key = m.group(1).lower(), m.group(2).lower()
    report(key_known(section, key), f"{where}: {name} -> [{section}] {key}")

yaml_files = sorted(glob.glob("deploy/**/*.yml", recursive=True) + glob.glob("deploy/**/*.yaml", recursive=True))
docs_by_file = {}
for path in yaml_files:
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        docs_by_file[path] = docs
        report(True, f"{path}: parses ({len(docs)} document{'s' if len(docs) != 1 else ''})")
    except yaml.YAMLError as e:
        report(False, f"{path}: {e}")

# compose: environment variable names
compose = docs_by_file.get("deploy/docker-compose.yml", [None])[0]
if isinstance(compose, dict):
    services = compose.get("services") or {}
    for need in ("redpanda", "clickhouse", "postgres", "migrate", "tally"):
        report(need in services, f"docker-compose.yml: service {need}")
    for name, svc in services.items():
        env = (svc or {}).get("environment") or {}
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for n in names:
            check_env_name(n, f"docker-compose.yml {name}")
        if name in ("migrate", "tally"):
            for n in ("TALLY__KAFKA__BROKERS", "TALLY__CLICKHOUSE__URL", "TALLY__POSTGRES__URL"):
                report(n in names, f"docker-compose.yml {name}: sets {n}")
        hc = ((svc or {}).get("healthcheck") or {}).get("test")
        if hc is not None:
            good = isinstance(hc, str) or (isinstance(hc, list) and all(isinstance(x, str) for x in hc))
            report(good, f"docker-compose.yml {name}: healthcheck.test is a string or a list of strings")
    reps = ((services.get("tally") or {}).get("deploy") or {}).get("replicas")
    report(reps == 2, f"docker-compose.yml tally: replicas = {reps}")

# k8s: document shape, then specifics
kinds = {}
for path, docs in docs_by_file.items():
    if not path.startswith("deploy/k8s/"):
        continue
    for i, d in enumerate(docs):
        where = f"{path}#{i}"
        if not isinstance(d, dict):
            report(False, f"{where}: not a mapping")
            continue
        if d.get("kind") == "Kustomization":
            for r in d.get("resources", []):
                report(os.path.exists(os.path.join("deploy/k8s", r)), f"{where}: resource {r} exists")
            continue
        name = (d.get("metadata") or {}).get("name")
        okd = bool(d.get("apiVersion")) and bool(d.get("kind")) and bool(name)
        report(okd, f"{where}: {d.get('apiVersion')} {d.get('kind')} {name}")
        kinds.setdefault(d.get("kind"), []).append(d)

for need in ("Namespace", "ConfigMap", "Secret", "Job", "Deployment"):
    report(need in kinds, f"k8s: has a {need}")

for cm in kinds.get("ConfigMap", []):
    toml_text = (cm.get("data") or {}).get("tally.toml")
    if toml_text is None or tomllib is None:
        continue
    try:
        conf = tomllib.loads(toml_text)
        report(True, f"ConfigMap {cm['metadata']['name']}: tally.toml parses")
    except Exception as e:
        report(False, f"ConfigMap {cm['metadata']['name']}: tally.toml: {e}")
        continue
    for section, table in conf.items():
        if not isinstance(table, dict):
            report(False, f"tally.toml: top-level key {section} is not a section")
            continue
        for key in table:
            report(key_known(section, key), f"tally.toml: [{section}] {key}")

for sec in kinds.get("Secret", []):
    for n in list((sec.get("stringData") or {}).keys()) + list((sec.get("data") or {}).keys()):
        check_env_name(n, f"Secret {sec['metadata']['name']}")

for dep in kinds.get("Deployment", []):
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    report(spec.get("replicas") == 2, f"Deployment {dep['metadata']['name']}: replicas 2")
    report(pod.get("terminationGracePeriodSeconds") == 30, "Deployment: terminationGracePeriodSeconds 30")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        report(hg.get("path") == path, f"Deployment: {probe} GET {path}")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    report(9898 in ports.values(), "Deployment: container port 9898")
    res = c.get("resources") or {}
    report(res.get("requests") == {"cpu": "500m", "memory": "256Mi"}, f"Deployment: requests {res.get('requests')}")
    report(res.get("limits") == {"cpu": "2", "memory": "512Mi"}, f"Deployment: limits {res.get('limits')}")
    sel = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    report(all(labels.get(k) == v for k, v in sel.items()), "Deployment: selector matches pod labels")
    for e in c.get("env", []):
        check_env_name(e["name"], "Deployment env")

sys.exit(1 if failed else 0)
PY

# ---- docker compose -------------------------------------------------------------------------
compose_file=deploy/docker-compose.yml
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  if docker compose -f "$compose_file" config -q; then ok "docker compose config -q"; else bad "docker compose config -q"; fi
elif command -v docker-compose >/dev/null 2>&1; then
  if docker-compose -f "$compose_file" config -q; then ok "docker-compose config -q ($(docker-compose version --short 2>/dev/null))"; else bad "docker-compose config -q"; fi
else
  skip "docker compose config: the docker compose plugin is not installed here (YAML was still checked)"
fi

# ---- Dockerfile -----------------------------------------------------------------------------
df=deploy/Dockerfile
dockerfile_ok=1
grep -Eq '^FROM rust:1-bookworm AS builder' "$df" || { echo "  FAIL  $df: no 'FROM rust:1-bookworm AS builder'"; dockerfile_ok=0; }
grep -Eq '^FROM debian:bookworm-slim' "$df" || { echo "  FAIL  $df: no 'FROM debian:bookworm-slim'"; dockerfile_ok=0; }
grep -Eq 'cargo build --release .*-p tally' "$df" || { echo "  FAIL  $df: no 'cargo build --release -p tally'"; dockerfile_ok=0; }
grep -Eq '^ENTRYPOINT \["tally"\]' "$df" || { echo "  FAIL  $df: ENTRYPOINT is not [\"tally\"]"; dockerfile_ok=0; }
grep -Eq '^CMD \["run"\]' "$df" || { echo "  FAIL  $df: CMD is not [\"run\"]"; dockerfile_ok=0; }
grep -Eq '^USER ' "$df" || { echo "  FAIL  $df: no USER (must not run as root)"; dockerfile_ok=0; }
# Every COPY source from the build context must exist.
while read -r src; do
  [[ -e "$src" ]] || { echo "  FAIL  $df: COPY source '$src' does not exist"; dockerfile_ok=0; }
done < <(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$df")
if ((dockerfile_ok)); then ok "$df: stages, build command, ENTRYPOINT/CMD, USER, COPY sources"; else bad "$df"; fi
if command -v hadolint >/dev/null 2>&1; then
  if hadolint "$df"; then ok "hadolint $df"; else bad "hadolint $df"; fi
fi
skip "docker build: no Docker engine on this machine"

if ((fail)); then
  echo "deploy validation: FAILED"
  exit 1
fi
echo "deploy validation: ok"
