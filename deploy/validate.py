#!/usr/bin/env python3
"""The checks of deploy/validate.sh (which installs what this needs and runs the tools).

  - every YAML file under deploy/ parses;
  - Kubernetes: every manifest in deploy/k8s (and the `kustomize build` output, when given)
    against the Kubernetes API's JSON schemas (kubernetes-validate, strict: unknown fields are
    errors) and the custom resources against their CRDs' openAPIV3Schema (deploy/schemas/);
    kustomization.yaml lists every manifest but secret.yaml, which it must not apply;
  - consistency: tally config keys (ConfigMap tally.toml, TALLY__SECTION__KEY variables)
    against consumers/src/config.defaults.toml plus deploy/pending-config-keys.txt; the
    ScaledObject's brokers, groups, topics and replica bound, the NetworkPolicy's peers,
    the Secret mounts of the *_file keys, probes and securityContext, the selectors of the
    Service, PDB and ServiceMonitor; the PrometheusRule's spec equals alerts.yml;
  - docker-compose.yml against the compose-spec JSON schema (check-jsonschema's vendored
    copy), then its services, dependencies, bind mounts, the Prometheus scrape targets and
    Grafana's provisioning against the dashboard's data sources.
Writes, for validate.sh's promtool runs: --rules-out (the PrometheusRule's spec as a rule
file) and --prom-config-out (the compose Prometheus config, its rule_files pointed at
deploy/prometheus/alerts.yml).
"""
import argparse
import functools
import glob
import json
import os
import re
import sys
import tomllib
from importlib import resources
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate.utils as kv
import yaml

K8S_DIR = "deploy/k8s"
COMPOSE = "deploy/docker-compose.yml"
DEFAULTS = "consumers/src/config.defaults.toml"
PENDING = "deploy/pending-config-keys.txt"
ALERTS = "deploy/prometheus/alerts.yml"
DASHBOARD = "deploy/grafana/tally-dashboard.json"
# Kubernetes versions the manifests must be valid for: the oldest supported and the newest
# that kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kv.latest_version())
# Metadata keys of KEDA's kafka trigger (KEDA v2.20.2, pkg/scalers/kafka_scaler.go: the
# triggerMetadata ones; the authParams ones belong in a TriggerAuthentication).
KEDA_KAFKA_KEYS = {
    "bootstrapServers", "consumerGroup", "topic", "partitionLimitation", "lagThreshold",
    "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag",
    "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "tls", "unsafeSsl", "sasl",
    "saslTokenProvider", "awsRegion",
}
SECRET_MODE_MASK = 0o007  # secret files must not be world-readable


class Report:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, cond, what, detail=""):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print(f"  FAIL  {what}" + (f": {detail}" if detail else ""))
        return cond

    def ok(self, what):
        print(f"  ok    {what}")

    def note(self, what):
        print(f"  note  {what}")


R = Report()


def load_yaml_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---- tally config keys ------------------------------------------------------------------------
with open(DEFAULTS, "rb") as f:
    DEFAULT_CONF = tomllib.load(f)
PENDING_KEYS = set()
if os.path.exists(PENDING):
    with open(PENDING) as f:
        PENDING_KEYS = {l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")}


def in_defaults(section, key):
    return isinstance(DEFAULT_CONF.get(section), dict) and key in DEFAULT_CONF[section]


pending_used = set()


def check_key(section, key, where):
    if in_defaults(section, key):
        R.check(True, "")
    elif f"{section}.{key}" in PENDING_KEYS:
        pending_used.add(f"{section}.{key}")
        R.check(True, "")
    else:
        R.check(False, f"{where}: [{section}] {key} is not a tally config key",
                f"not in {DEFAULTS} nor {PENDING}")


def check_env_name(name, where, tally=True):
    """A TALLY__SECTION__KEY variable names a config key; in tally's own environment
    (tally=True) any other TALLY_ variable but TALLY_CONFIG is a misspelling."""
    m = re.fullmatch(r"TALLY__([A-Z0-9_]+?)__([A-Z0-9_]+)", name)
    if m:
        check_key(m.group(1).lower(), m.group(2).lower(), f"{where}: {name}")
    elif tally and name.startswith("TALLY_") and name != "TALLY_CONFIG":
        R.check(False, f"{where}: {name}", "not TALLY__SECTION__KEY nor TALLY_CONFIG")


def check_toml(conf, where):
    for section, table in conf.items():
        if not R.check(isinstance(table, dict), f"{where}: top-level {section} is a section"):
            continue
        for key in table:
            check_key(section, key, where)


def effective(conf, section, key):
    return conf.get(section, {}).get(key, DEFAULT_CONF[section][key])


# ---- Kubernetes schemas -----------------------------------------------------------------------
# kubernetes-validate reads its (large) definitions file per call: read each file once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
SCHEMA_ONE = ("items", "additionalProperties", "not")


def strict_schema(s):
    """A CRD's structural OpenAPI v3 schema as JSON Schema: undeclared fields rejected (unless
    x-kubernetes-preserve-unknown-fields), nullable and int-or-string spelled out."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in SCHEMA_MAPS:
            out[k] = {name: strict_schema(sub) for name, sub in v.items()}
        elif k in SCHEMA_LISTS:
            out[k] = [strict_schema(sub) for sub in v]
        elif k in SCHEMA_ONE and isinstance(v, dict):
            out[k] = strict_schema(v)
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


CRDS = {}
for path in sorted(glob.glob("deploy/schemas/crds/*.yaml")):
    for crd in load_yaml_all(path):
        spec = crd["spec"]
        for ver in spec["versions"]:
            schema = strict_schema(ver["schema"]["openAPIV3Schema"])
            api = f"{spec['group']}/{ver['name']}"
            schema.setdefault("properties", {})
            schema["properties"]["apiVersion"] = {"const": api}
            schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            CRDS[(api, spec["names"]["kind"])] = (jsonschema.Draft7Validator(schema), os.path.basename(path))


def validate_k8s(doc, where):
    """Schema validation of one manifest; True if valid."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    label = f"{where} {kind}/{name}"
    if (api, kind) in CRDS:
        validator, crd_file = CRDS[(api, kind)]
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        for e in errors[:10]:
            R.check(False, f"{label} (CRD {crd_file})", f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
        if not errors:
            R.check(True, "")
        return not errors
    good = True
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
            R.check(True, "")
        except kv.ValidationError as e:
            good = R.check(False, f"{label} (Kubernetes {e.version})", f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
        except kv.SchemaNotFoundError as e:
            good = R.check(False, label, e.message + " (and no CRD in deploy/schemas/crds)")
            break
    return good


# ---- Kubernetes: files, kustomization, build output ----------------------------------------------
def k8s_checks(kustomize_output):
    print("Kubernetes manifests")
    kust_path = os.path.join(K8S_DIR, "kustomization.yaml")
    kust = load_yaml_all(kust_path)[0]
    resources_ = kust.get("resources", [])
    manifests = sorted(os.path.basename(p) for p in glob.glob(os.path.join(K8S_DIR, "*.yaml")))
    for r in resources_:
        R.check(os.path.exists(os.path.join(K8S_DIR, r)), f"kustomization.yaml: resource {r} exists")
    R.check("secret.yaml" not in resources_, "kustomization.yaml does not apply secret.yaml (placeholder credentials)")
    for m in manifests:
        if m not in ("kustomization.yaml", "secret.yaml"):
            R.check(m in resources_, f"kustomization.yaml lists {m}")

    docs = {}  # (kind, name) -> doc, from the files
    n_files = 0
    for m in manifests:
        if m == "kustomization.yaml":
            continue
        for d in load_yaml_all(os.path.join(K8S_DIR, m)):
            n_files += 1
            validate_k8s(d, m)
            meta = d.get("metadata") or {}
            if d.get("kind") != "Namespace":
                R.check(meta.get("namespace") == "tally", f"{m} {d.get('kind')}/{meta.get('name')}: namespace tally")
            docs[(d.get("kind"), meta.get("name"))] = d
    R.ok(f"{n_files} manifests in {K8S_DIR}/ checked against Kubernetes {' and '.join(K8S_VERSIONS)} "
         f"schemas (strict) and the CRDs of {', '.join(sorted({k for _, k in CRDS}))}")

    if kustomize_output:
        built = load_yaml_all(kustomize_output)
        for d in built:
            validate_k8s(d, "kustomize build")
        kinds = sorted({d["kind"] for d in built})
        R.check("Secret" not in kinds, "kustomize build: applies no Secret")
        want = {(k, n) for (k, n) in docs if k != "Secret"}
        got = {(d["kind"], d["metadata"]["name"]) for d in built}
        R.check(want == got, "kustomize build: exactly the manifests of the files",
                f"missing {sorted(want - got)}, extra {sorted(got - want)}")
        R.ok(f"kustomize build: {len(built)} resources ({', '.join(kinds)}) valid")
    return docs


def labels_match(selector, labels):
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def k8s_consistency(docs):
    print("Kubernetes consistency")
    get = lambda kind, name: docs.get((kind, name))
    cm = get("ConfigMap", "tally-config")
    if not R.check(cm is not None, "ConfigMap tally-config exists"):
        return
    conf = tomllib.loads(cm["data"]["tally.toml"])
    check_toml(conf, "ConfigMap tally-config tally.toml")
    listen_port = int(effective(conf, "server", "listen").rsplit(":", 1)[1])
    R.check(not effective(conf, "server", "listen").startswith("127."), "tally.toml: server.listen is not loopback-only")

    secret = get("Secret", "tally-secrets")
    R.check(secret is not None, "secret.yaml: placeholder Secret tally-secrets documented")
    secret_keys = set((secret or {}).get("stringData", {})) | set((secret or {}).get("data", {}))
    file_keys = {f"{s}.{k}": v for s, t in conf.items() if isinstance(t, dict) for k, v in t.items() if k.endswith("_file")}
    R.check(bool(file_keys), "tally.toml: secrets are read from files (*_file keys)")

    dep = get("Deployment", "tally")
    job = get("Job", "tally-migrate")
    pod_labels = {}
    for obj in (dep, job):
        if not R.check(obj is not None, "Deployment tally and Job tally-migrate exist"):
            continue
        kind = obj["kind"]
        tmpl = obj["spec"]["template"]
        pod = tmpl["spec"]
        pod_labels[kind] = tmpl["metadata"].get("labels", {})
        psc = pod.get("securityContext") or {}
        R.check(psc.get("runAsNonRoot") is True, f"{kind}: pod runAsNonRoot")
        R.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{kind}: pod seccompProfile RuntimeDefault")
        R.check(pod.get("automountServiceAccountToken") is False, f"{kind}: no service account token mounted")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c.get("securityContext") or {}
            cn = f"{kind} container {c['name']}"
            R.check(sc.get("readOnlyRootFilesystem") is True, f"{cn}: readOnlyRootFilesystem")
            R.check(sc.get("allowPrivilegeEscalation") is False, f"{cn}: allowPrivilegeEscalation false")
            R.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{cn}: drops ALL capabilities")
            R.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cn}: runAsNonRoot")
            env = c.get("env", [])
            for e in env:
                check_env_name(e["name"], cn)
                R.check("secretKeyRef" not in (e.get("valueFrom") or {}), f"{cn}: env {e['name']} not from a Secret (secrets are files)")
            R.check(not any("secretRef" in ef for ef in c.get("envFrom", [])), f"{cn}: no envFrom Secret (secrets are files)")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            cfg = next((e.get("value") for e in env if e["name"] == "TALLY_CONFIG"), None)
            if R.check(cfg is not None, f"{cn}: TALLY_CONFIG set"):
                m = mounts.get(os.path.dirname(cfg))
                v = vols.get(m["name"]) if m else None
                R.check(bool(v) and (v.get("configMap") or {}).get("name") == "tally-config"
                        and os.path.basename(cfg) in cm["data"],
                        f"{cn}: {cfg} is tally.toml of ConfigMap tally-config")
            for key, path in file_keys.items():
                m = mounts.get(os.path.dirname(path))
                v = vols.get(m["name"]) if m else None
                sv = (v or {}).get("secret") or {}
                R.check(bool(sv) and sv.get("secretName") == "tally-secrets" and m.get("readOnly") is True,
                        f"{cn}: {key} = {path} is in a read-only mount of Secret tally-secrets")
                R.check(os.path.basename(path) in secret_keys, f"secret.yaml documents the key {os.path.basename(path)} ({key})")
                R.check(isinstance(sv.get("defaultMode"), int) and not (sv["defaultMode"] & SECRET_MODE_MASK),
                        f"{cn}: Secret files not world-readable (defaultMode)")

    if dep:
        c = dep["spec"]["template"]["spec"]["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        R.check(listen_port in ports.values(), f"Deployment: containerPort {listen_port} (server.listen)")
        for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            hg = (c.get(probe) or {}).get("httpGet") or {}
            R.check(hg.get("path") == path, f"Deployment: {probe} GET {path}")
            port = hg.get("port")
            R.check(ports.get(port, port) == listen_port, f"Deployment: {probe} on port {listen_port}")
        R.check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels.get("Deployment")),
                "Deployment: selector matches its pod labels")

    svc = get("Service", "tally-metrics")
    if R.check(svc is not None, "Service tally-metrics exists") and dep:
        R.check(labels_match(svc["spec"]["selector"], pod_labels.get("Deployment")), "Service tally-metrics selects the pipeline pods")
        R.check(not labels_match(svc["spec"]["selector"], pod_labels.get("Job")), "Service tally-metrics does not select the migrate Job")
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            R.check(ports.get(tp, tp) == listen_port, f"Service port {p.get('name')} targets {listen_port}")

    pdb = get("PodDisruptionBudget", "tally")
    if R.check(pdb is not None, "PodDisruptionBudget exists") and dep:
        R.check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels.get("Deployment")), "PDB selects the pipeline pods")

    sm = get("ServiceMonitor", "tally")
    if R.check(sm is not None, "ServiceMonitor exists") and svc:
        R.check(labels_match(sm["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels")), "ServiceMonitor selects Service tally-metrics")
        names = {p.get("name") for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            R.check(ep.get("port") in names, f"ServiceMonitor endpoint port {ep.get('port')} is a Service port")
            R.check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor scrapes /metrics")

    so = get("ScaledObject", "tally")
    if R.check(so is not None, "ScaledObject exists") and dep:
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        R.check(ref.get("kind", "Deployment") == "Deployment" and ref["name"] == dep["metadata"]["name"], "ScaledObject scales Deployment tally")
        R.check("replicas" not in dep["spec"], "Deployment sets no replicas (the ScaledObject owns the count)")
        usage_parts = effective(conf, "kafka", "usage_partitions")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        R.check(1 <= lo <= hi, f"ScaledObject: 1 <= minReplicaCount {lo} <= maxReplicaCount {hi}")
        R.check(hi <= usage_parts, f"ScaledObject: maxReplicaCount {hi} <= kafka.usage_partitions {usage_parts}")
        group = effective(conf, "kafka", "group_id")
        want = {}
        if effective(conf, "streams", "usage"):
            want[group] = effective(conf, "kafka", "usage_topic")
        if effective(conf, "streams", "policy"):
            want[f"{group}.policy"] = effective(conf, "policy", "topic")
        if effective(conf, "streams", "audit"):
            want[f"{group}.audit"] = effective(conf, "audit", "topic")
        got = {}
        for t in spec["triggers"]:
            md = t.get("metadata", {})
            R.check(t["type"] == "kafka", f"ScaledObject trigger {t.get('name')}: type kafka")
            R.check(set(md) <= KEDA_KAFKA_KEYS, f"ScaledObject trigger {t.get('name')}: known kafka metadata keys", str(sorted(set(md) - KEDA_KAFKA_KEYS)))
            R.check(md.get("bootstrapServers") == effective(conf, "kafka", "brokers"), f"ScaledObject trigger {t.get('name')}: bootstrapServers = kafka.brokers")
            for k in ("lagThreshold", "activationLagThreshold"):
                if k in md:
                    R.check(str(md[k]).isdigit(), f"ScaledObject trigger {t.get('name')}: {k} is a whole number")
            R.check(md.get("consumerGroup") not in got, f"ScaledObject: one trigger for group {md.get('consumerGroup')}")
            got[md.get("consumerGroup")] = md.get("topic")
        R.check(got == want, "ScaledObject: one trigger per consumer group and its topic", f"want {want}, have {got}")

    np_ = get("NetworkPolicy", "tally")
    if R.check(np_ is not None, "NetworkPolicy exists"):
        spec = np_["spec"]
        for kind, labels in pod_labels.items():
            R.check(labels_match(spec["podSelector"]["matchLabels"], labels), f"NetworkPolicy applies to the {kind}'s pods")
        R.check({"Ingress", "Egress"} <= set(spec.get("policyTypes", [])), "NetworkPolicy: policyTypes Ingress and Egress")
        ing_ports = [p for rule in spec.get("ingress", []) for p in (rule.get("ports") or [None])]
        R.check(bool(ing_ports) and all(p and p.get("port") in (listen_port, "http") for p in ing_ports),
                f"NetworkPolicy: ingress only to port {listen_port}")
        egress = spec.get("egress", [])

        def allows(ns, port, proto="TCP"):
            for rule in egress:
                peers = rule.get("to") or []
                ns_ok = not peers or any(
                    (p.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == ns for p in peers)
                ports = rule.get("ports")
                port_ok = not ports or any(p.get("port") == port and p.get("protocol", "TCP") == proto for p in ports)
                if ns_ok and port_ok:
                    return True
            return False

        R.check(allows("kube-system", 53, "UDP") and allows("kube-system", 53, "TCP"), "NetworkPolicy: egress to DNS (53/UDP, 53/TCP)")
        endpoints = [("kafka.brokers", b.strip()) for b in effective(conf, "kafka", "brokers").split(",")]
        for key, default_port in (("clickhouse.url", 8123), ("postgres.url", 5432), ("registry.url", 8081)):
            url = effective(conf, *key.split("."))
            if url:
                u = urlsplit(url)
                endpoints.append((key, f"{u.hostname}:{u.port or {'https': 443, 'http': 80}.get(u.scheme, default_port)}"))
        for key, hp in endpoints:
            host, port = hp.rsplit(":", 1)
            parts = host.split(".")
            if len(parts) >= 3 and parts[2] == "svc":
                R.check(allows(parts[1], int(port)), f"NetworkPolicy: egress to {key} ({host}:{port}, namespace {parts[1]})")
            else:
                R.note(f"{key} {host} is not an in-cluster service name: its NetworkPolicy peer is not checked")

    pr = get("PrometheusRule", "tally")
    if R.check(pr is not None, "PrometheusRule exists"):
        with open(ALERTS) as f:
            alerts = yaml.safe_load(f)
        R.check(pr["spec"] == alerts, f"PrometheusRule spec equals {ALERTS}", "run make k8s-prometheusrule")
        return pr["spec"]


# ---- docker compose ---------------------------------------------------------------------------
def compose_checks(prom_config_out):
    print("docker-compose.yml")
    compose = load_yaml_all(COMPOSE)[0]
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors[:10]:
        R.check(False, f"{COMPOSE} (compose-spec schema)", f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    if not errors:
        R.check(True, "")
        R.ok(f"{COMPOSE} valid against the compose-spec JSON schema")
    base = os.path.dirname(COMPOSE)
    services = compose.get("services", {})
    for need in ("kafka", "schema-registry", "clickhouse", "postgres", "prometheus", "grafana",
                 "migrate", "seed", "gen", "tally-1", "tally-2"):
        R.check(need in services, f"compose: service {need}")

    def env_of(svc):
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        return env

    def cmd_of(svc):
        c = svc.get("command") or []
        return c.split() if isinstance(c, str) else c

    kafka_env = env_of(services.get("kafka", {}))
    R.check(services.get("kafka", {}).get("image", "").startswith("apache/kafka:")
            and "controller" in str(kafka_env.get("KAFKA_PROCESS_ROLES", "")),
            "compose: kafka is apache/kafka in KRaft mode (process roles include controller)")

    run_ids = {}
    for name, svc in services.items():
        env = env_of(svc)
        for n in env:
            check_env_name(n, f"compose {name}", tally=svc.get("image", "").startswith("tally:"))
        for dep in (svc.get("depends_on") or {}):
            R.check(dep in services, f"compose {name}: depends_on {dep} is a service")
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else (v.get("source") if v.get("type") == "bind" else None)
            if src and (src.startswith(".") or src.startswith("/")):
                R.check(os.path.exists(os.path.normpath(os.path.join(base, src))), f"compose {name}: bind mount source {src} exists")
        cmd = cmd_of(svc)
        if svc.get("image", "").startswith("tally:") and cmd[:1] == ["run"]:
            run_ids[name] = env.get("TALLY__KAFKA__INSTANCE_ID")
            deps = svc.get("depends_on") or {}
            R.check(isinstance(deps, dict) and (deps.get("migrate") or {}).get("condition") == "service_completed_successfully",
                    f"compose {name}: starts after migrate completed")
            R.check(svc.get("stop_grace_period") is not None, f"compose {name}: stop_grace_period (SIGTERM drains)")
    R.check(len(run_ids) >= 2, "compose: two or more `tally run` instances", str(sorted(run_ids)))
    ids = list(run_ids.values())
    R.check(all(ids) and len(set(ids)) == len(ids), "compose: tally run instances have distinct kafka.instance_id", str(run_ids))
    for one, after in (("seed", "migrate"), ("gen", "seed")):
        deps = services.get(one, {}).get("depends_on") or {}
        R.check(isinstance(deps, dict) and (deps.get(after) or {}).get("condition") == "service_completed_successfully",
                f"compose {one}: starts after {after} completed")
    R.check(cmd_of(services.get("migrate", {}))[:1] == ["migrate"], "compose migrate: tally migrate")
    R.check(cmd_of(services.get("seed", {}))[:1] == ["seed"], "compose seed: tally seed")

    # Prometheus: scrapes every tally run instance, loads alerts.yml.
    prom = services.get("prometheus", {})
    mounts = {}
    for v in prom.get("volumes") or []:
        if isinstance(v, str) and v.count(":") >= 1:
            src, dst = v.split(":")[:2]
            mounts[dst] = os.path.normpath(os.path.join(base, src))
    cfg_path = next((a.split("=", 1)[1] for a in cmd_of(prom) if a.startswith("--config.file=")), "/etc/prometheus/prometheus.yml")
    local_cfg = mounts.get(cfg_path)
    if R.check(local_cfg is not None and os.path.exists(local_cfg), f"compose prometheus: {cfg_path} is a mounted file"):
        with open(local_cfg) as f:
            pcfg = yaml.safe_load(f)
        targets = {t for sc in pcfg.get("scrape_configs", []) for st in sc.get("static_configs", []) for t in st.get("targets", [])}
        jobs = {sc["job_name"] for sc in pcfg.get("scrape_configs", [])}
        for name in run_ids:
            R.check(f"{name}:9898" in targets, f"compose prometheus: scrapes {name}:9898")
        R.check("tally" in jobs, "compose prometheus: job \"tally\" (the job alerts and dashboard use)")
        rules = pcfg.get("rule_files", [])
        local_rules = [mounts.get(r) for r in rules]
        R.check(os.path.abspath(ALERTS) in [os.path.abspath(p) for p in local_rules if p],
                f"compose prometheus: loads {ALERTS}", str(rules))
        pcfg["rule_files"] = [os.path.abspath(p) if p else r for p, r in zip(local_rules, rules)]
        with open(prom_config_out, "w") as f:
            yaml.safe_dump(pcfg, f)

    # Grafana: provisioned data sources of the types the dashboard asks for, the dashboard
    # file where the provider reads, the non-core plugins installed.
    graf = services.get("grafana", {})
    gmounts = {}
    for v in graf.get("volumes") or []:
        if isinstance(v, str) and v.count(":") >= 1:
            src, dst = v.split(":")[:2]
            gmounts[dst.rstrip("/")] = os.path.normpath(os.path.join(base, src))
    prov = gmounts.get("/etc/grafana/provisioning")
    if R.check(prov is not None, "compose grafana: /etc/grafana/provisioning mounted"):
        with open(DASHBOARD) as f:
            dash = json.load(f)
        ds_types = {v["query"] for v in dash.get("templating", {}).get("list", []) if v.get("type") == "datasource"}
        provided = set()
        for p in glob.glob(os.path.join(prov, "datasources", "*.y*ml")):
            provided |= {d["type"] for d in load_yaml_all(p)[0].get("datasources", [])}
        for t in sorted(ds_types):
            R.check(t in provided, f"grafana provisioning: a {t} data source (the dashboard's)")
        plugins = str(env_of(graf).get("GF_INSTALL_PLUGINS", "")) + "," + str(env_of(graf).get("GF_PLUGINS_PREINSTALL", ""))
        for t in sorted(ds_types - {"prometheus"}):
            R.check(t in plugins, f"compose grafana: plugin {t} installed")
        dash_dirs = set()
        for p in glob.glob(os.path.join(prov, "dashboards", "*.y*ml")):
            dash_dirs |= {pr["options"]["path"].rstrip("/") for pr in load_yaml_all(p)[0].get("providers", [])}
        mounted_dash = [dst for dst, src in gmounts.items() if os.path.abspath(src) == os.path.abspath(DASHBOARD)]
        R.check(any(os.path.dirname(d) in dash_dirs or d in dash_dirs for d in mounted_dash),
                f"grafana provisioning: {DASHBOARD} is mounted where a dashboard provider reads", f"{mounted_dash} vs {dash_dirs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kustomize-output")
    ap.add_argument("--rules-out", required=True)
    ap.add_argument("--prom-config-out", required=True)
    args = ap.parse_args()

    print("YAML")
    n = 0
    for path in sorted(glob.glob("deploy/**/*.yml", recursive=True) + glob.glob("deploy/**/*.yaml", recursive=True)):
        try:
            load_yaml_all(path)
            n += 1
        except yaml.YAMLError as e:
            R.check(False, path, str(e))
    R.ok(f"{n} YAML files parse")

    docs = k8s_checks(args.kustomize_output)
    before = (R.passed, R.failed)
    spec = k8s_consistency(docs)
    if R.failed == before[1]:
        R.ok(f"{R.passed - before[0]} checks: config keys, Secret mounts, probes, securityContext, selectors, "
             "ScaledObject vs groups/topics/partitions, NetworkPolicy vs endpoints, PrometheusRule = alerts.yml")
    before = (R.passed, R.failed)
    if spec is not None:
        with open(args.rules_out, "w") as f:
            yaml.safe_dump(spec, f)
    compose_checks(args.prom_config_out)
    if R.failed == before[1]:
        R.ok(f"{R.passed - before[0]} checks: services, dependencies, config keys, instance ids, bind mounts, "
             "Prometheus targets and rules, Grafana data sources and dashboard")

    for key in sorted(PENDING_KEYS):
        s, k = key.split(".", 1)
        if in_defaults(s, k):
            R.note(f"{PENDING}: {key} is now in {DEFAULTS}: delete its line")
        elif key in pending_used:
            R.note(f"{key} accepted from {PENDING} (not in {DEFAULTS} yet)")
    print(f"{R.passed} checks passed, {R.failed} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
