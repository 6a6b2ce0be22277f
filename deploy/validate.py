#!/usr/bin/env python3
"""Check the files under deploy/ for consistency with each other and with wsgate's metric list
(src/metrics.rs, docs/ARCHITECTURE.md "Metrics").

    python3 deploy/validate.py          (exit 0: all good, 1: problems found, 2: missing PyYAML)

What it checks:
  * every YAML (.yml/.yaml, all documents) and JSON file under deploy/ parses, and so does
    the TOML (deploy/wsgate.toml and the wsgate.toml inside the Kubernetes ConfigMap);
  * every metric named in a PromQL expression (alert rules, rule unit tests, Grafana panel
    queries and template variables) is one of wsgate's metrics (src/metrics.rs)
    (histograms only through their _bucket/_sum/_count series), a process_* metric, or
    Prometheus' own `up`;
  * label matchers and by/on/... clauses use labels those metrics have, and fixed label
    values (result, reason, direction) are ones wsgate emits;
  * alert rules carry a severity and a summary; rule tests refer to existing alerts;
  * the Grafana dashboard's structure (schemaVersion, unique panel ids, gridPos, datasource
    references to its datasource variable);
  * the wsgate configs' fleet keys: each backend has exactly one of addr / dns, durations
    parse, drain_spread is a duration or "none", close_spread fits in half of drain,
    admin.allow holds CIDRs;
  * cross-file facts: routes name existing pools, ports in the config match the container
    ports, probes, Prometheus annotations, Service target ports and EXPOSE; grace periods
    and stop timeouts exceed the drain timeout (in Kubernetes: preStop sleep + drain);
    admin.token_file is mounted; files referenced by rule_files and kustomization.yaml
    exist, and kustomization.yaml lists every manifest beside it;
  * DNS discovery in Kubernetes: a pool's dns name is a headless Service here that does
    not publish not-ready pods, its port is a container port of the pods it selects, and
    those pods' preStop sleep outlasts the worst-case drain (DNS cache + resolve_every +
    remove_after + drain_spread + close_timeout), within their grace
    period; a drain hook's DRAIN_SPREAD, POOL and BACKEND_PORT match the pool.
If `promtool` is on PATH it is also used: `check rules`, `test rules`, `check config`, and a
parse of every dashboard query. Without it those checks are skipped (said so on the output).
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:
    print("validate.py needs PyYAML. Install it with:\n\n    pip install pyyaml\n", file=sys.stderr)
    sys.exit(2)

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover - older Pythons skip the TOML checks
    tomllib = None

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent

# --------------------------------------------------------------------------------------
# The metric interface, copied from src/metrics.rs (docs/ARCHITECTURE.md, "Metrics"). Keep in sync.
# name -> (type, labels, {label: allowed values} for labels with a fixed set of values)
# --------------------------------------------------------------------------------------
CLOSE_REASONS = {
    "client_close", "backend_close", "client_gone", "backend_gone", "pong_timeout",
    "idle_timeout", "message_too_big", "protocol_error", "shutdown", "max_lifetime",
    "backend_protocol_error", "backend_pong_timeout", "client_stalled", "backend_stalled",
    "backend_drain",
}
DIRECTIONS = {"client_to_backend", "backend_to_client"}
PROTOCOLS = {"h1", "h2"}
METRICS = {
    "wsgate_connections_accepted_total": ("counter", {"listener"}, {}),
    "wsgate_worker_connections_accepted_total": ("counter", {"listener", "worker"}, {}),
    "wsgate_connections_active": ("gauge", {"listener"}, {}),
    "wsgate_http_requests_total": ("counter", {"route", "status_class", "protocol"},
                                   {"protocol": PROTOCOLS}),
    "wsgate_http_request_duration_seconds": ("histogram", {"route"}, {}),
    "wsgate_ws_upgrades_total": ("counter", {"route", "result", "protocol"},
                                 {"result": {"ok", "rejected", "limited", "backend_error",
                                             "no_backend"},
                                  "protocol": PROTOCOLS}),
    "wsgate_ws_handshake_duration_seconds": ("histogram", {"route"}, {}),
    "wsgate_ws_tunnels_active": ("gauge", {"route", "backend", "protocol"}, {"protocol": PROTOCOLS}),
    "wsgate_ws_tunnels_parked": ("gauge", set(), {}),
    "wsgate_ws_tunnel_duration_seconds": ("histogram", {"route"}, {}),
    "wsgate_ws_closes_total": ("counter", {"route", "reason", "protocol"},
                               {"reason": CLOSE_REASONS, "protocol": PROTOCOLS}),
    "wsgate_ws_bytes_total": ("counter", {"route", "direction"}, {"direction": DIRECTIONS}),
    "wsgate_ws_frames_total": ("counter", {"route", "direction"}, {"direction": DIRECTIONS}),
    "wsgate_ws_ping_rtt_seconds": ("histogram", {"route"}, {}),
    "wsgate_backend_up": ("gauge", {"pool", "backend"}, {}),
    "wsgate_backend_connections_active": ("gauge", {"pool", "backend"}, {}),
    "wsgate_config_reloads_total": ("counter", {"result"}, {"result": {"ok", "error"}}),
    "wsgate_config_last_reload_success_timestamp_seconds": ("gauge", set(), {}),
    "wsgate_admission_rejections_total": ("counter", {"listener", "route", "reason"}, {}),
    "wsgate_admission_tracked_clients": ("gauge", {"scope", "name"},
                                         {"scope": {"listener", "route"}}),
    "wsgate_admission_handshakes_queued": ("gauge", {"listener"}, {}),
    "wsgate_admission_limit": ("gauge", {"scope", "name", "limit"},
                               {"scope": {"listener", "route"}}),
    "wsgate_backend_draining": ("gauge", {"pool", "backend"}, {}),
    "wsgate_discovery_resolutions_total": ("counter", {"pool", "dns", "result"},
                                           {"result": {"ok", "empty", "failed"}}),
    "wsgate_discovery_backends": ("gauge", {"pool", "dns"}, {}),
    "wsgate_config_generation": ("gauge", set(), {}),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# wsgate's defaults for the keys the cross-file checks use (src/config/model.rs).
DEFAULT_DRAIN = "30s"
DEFAULT_CLOSE_SPREAD = "5s"
DEFAULT_CLOSE_TIMEOUT = "2s"
DEFAULT_DRAIN_SPREAD = "60s"
DEFAULT_RESOLVE_EVERY = "10s"
DEFAULT_REMOVE_AFTER = "30s"
# Worst case between a pod's deletion and an answer without it from cluster DNS: the
# endpoint update (about 1 s) plus CoreDNS's cache of the record (the kubernetes
# plugin's TTL, 5 s by default).
CLUSTER_DNS_DELAY = 1 + 5
# Labels Prometheus attaches to every scraped series: job and instance always, the rest
# from the relabelling and static labels in deploy/prometheus/prometheus.yml.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "node", "environment"}
# Series Prometheus itself writes for each target.
PROMETHEUS_SERIES = {"up"}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
    # aggregation operators, which may be followed by `by (...)` instead of `(`
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "limitk", "limit_ratio",
}
GROUPING_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, msg):
        self.items.append(f"{where}: {msg}")


P = Problems()


def rel(path):
    return os.path.relpath(path, REPO)


# --------------------------------------------------------------------------------------
# A small PromQL scanner: enough to find metric names, label matchers and grouping labels.
# --------------------------------------------------------------------------------------
TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<num>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|s|m|h|d|w|y)(?:\d+(?:ms|s|m|h|d|w|y))*)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]@:])
""", re.VERBOSE)


def tokenize(expr):
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise ValueError(f"cannot scan PromQL at {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind in ("ws", "comment"):
            continue
        tokens.append((kind, m.group()))
    return tokens


def unquote(s):
    return s[1:-1]


def scan_promql(expr):
    """Returns (selectors, grouping_labels); a selector is (metric name or None, [(label, op, value)])."""
    toks = tokenize(expr)
    selectors, grouping = [], []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "op" and text == "[":  # range or subquery: skip to the matching ]
            while i < len(toks) and toks[i][1] != "]":
                i += 1
            i += 1
            continue
        if kind == "ident" and text.lower() in GROUPING_KEYWORDS and nxt[1] == "(":
            i += 2
            while i < len(toks) and toks[i][1] != ")":
                if toks[i][0] == "ident":
                    grouping.append(toks[i][1])
                i += 1
            i += 1
            continue
        if kind == "ident" and nxt[1] == "(":  # function or aggregation
            i += 1
            continue
        if kind == "ident" and text.lower() in PROMQL_KEYWORDS:
            i += 1
            continue
        if kind == "ident" or (kind == "op" and text == "{"):
            name = text if kind == "ident" else None
            if kind == "ident":
                i += 1
            matchers = []
            if i < len(toks) and toks[i][1] == "{":
                i += 1
                while i < len(toks) and toks[i][1] != "}":
                    if toks[i][1] == ",":
                        i += 1
                        continue
                    if i + 2 < len(toks) and toks[i][0] == "ident" and toks[i + 2][0] in ("str", "var"):
                        value = toks[i + 2][1]
                        matchers.append((toks[i][1], toks[i + 1][1], unquote(value) if toks[i + 2][0] == "str" else value))
                        i += 3
                    else:
                        raise ValueError(f"cannot read label matcher near {toks[i][1]!r}")
                i += 1
            selectors.append((name, matchers))
            continue
        i += 1
    return selectors, grouping


def alternatives(regex):
    """The literal alternatives of a regex like "a|b|c", or None when it is anything fancier."""
    return regex.split("|") if re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", regex) else None


def resolve_metric(name):
    """(base name, labels, enums, is_bucket) for a series name, or an error string."""
    if name in METRICS:
        mtype, labels, enums = METRICS[name]
        if mtype == "histogram":
            return f"{name} is a histogram: use {name}_bucket, {name}_sum or {name}_count"
        return name, labels, enums, False
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base in METRICS and METRICS[base][0] == "histogram":
            _, labels, enums = METRICS[base]
            return base, labels, enums, suffix == "_bucket"
    if name.startswith("process_") or name in PROMETHEUS_SERIES:
        return name, None, {}, False  # labels unknown: not checked
    return f"unknown metric {name!r} (not one of wsgate's metrics, src/metrics.rs)"


def counted_here(selectors):
    """How many metric names the selectors of one expression name."""
    n = 0
    for name, matchers in selectors:
        if name:
            n += 1
        else:
            for label, op, value in matchers:
                if label == "__name__":
                    n += len([value] if op == "=" else alternatives(value) or [])
    return n


def check_expr(where, expr, counts):
    try:
        selectors, grouping = scan_promql(expr)
    except ValueError as e:
        P.add(where, f"{e} in: {expr}")
        return
    names_in_expr, known_labels, open_labels = [], set(TARGET_LABELS), False
    for name, matchers in selectors:
        names = [name] if name else []
        if name is None:
            for label, op, value in matchers:
                if label == "__name__":
                    alts = [value] if op == "=" else alternatives(value) if op == "=~" else None
                    if alts is None:
                        P.add(where, f"cannot tell which metrics __name__{op}{value!r} selects")
                    else:
                        names.extend(alts)
            if not names:
                P.add(where, f"selector without a metric name: {expr}")
        for n in names:
            counts["metric references"] += 1
            r = resolve_metric(n)
            if isinstance(r, str):
                P.add(where, r)
                continue
            base, labels, enums, is_bucket = r
            names_in_expr.append(n)
            if labels is None:
                open_labels = True
                continue
            allowed = labels | TARGET_LABELS | ({"le"} if is_bucket else set())
            known_labels |= allowed
            for label, op, value in matchers:
                if label == "__name__":
                    continue
                if label not in allowed:
                    P.add(where, f"{n} has no label {label!r} (labels: {', '.join(sorted(labels)) or 'none'})")
                    continue
                if label in enums and not value.startswith("$"):
                    vals = [value] if op in ("=", "!=") else alternatives(value)
                    for v in vals or []:
                        if v not in enums[label]:
                            P.add(where, f"{n}{{{label}{op}{value!r}}}: {v!r} is not a {label} wsgate emits "
                                         f"({', '.join(sorted(enums[label]))})")
    if not selectors and "time()" not in expr:
        P.add(where, f"expression selects no metric: {expr}")
    # Grouping labels are checked only when every metric of the expression is known.
    if names_in_expr and len(names_in_expr) == counted_here(selectors) and not open_labels:
        for label in grouping:
            if label not in known_labels:
                P.add(where, f"grouping label {label!r} is not a label of {', '.join(sorted(set(names_in_expr)))}")


# --------------------------------------------------------------------------------------
# Per-file checks
# --------------------------------------------------------------------------------------
def parse_duration(s):
    """'30s', '5m', '1h30m', '250ms' -> seconds (float); None if not a duration."""
    total, pos = 0.0, 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos > 0 else None


def check_rules_file(path, doc, counts, alert_names):
    for g in doc.get("groups") or []:
        for rule in g.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            where = f"{rel(path)}: rule {name}"
            if not name or "expr" not in rule:
                P.add(where, "rule needs alert/record and expr")
                continue
            counts["expressions"] += 1
            check_expr(where, str(rule["expr"]), counts)
            if "alert" in rule:
                alert_names.add(name)
                if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                    P.add(where, "needs labels.severity: critical, warning or info")
                if not (rule.get("annotations") or {}).get("summary"):
                    P.add(where, "needs annotations.summary")
                if "for" in rule and parse_duration(str(rule["for"])) is None:
                    P.add(where, f"bad duration for: {rule['for']!r}")


def check_rule_tests(path, doc, counts, alert_names_by_file):
    names = set()
    for f in doc.get("rule_files") or []:
        target = (path.parent / f).resolve()
        if not target.exists():
            P.add(rel(path), f"rule_files entry {f!r} does not exist")
        names |= alert_names_by_file.get(target, set())
    for n, t in enumerate(doc.get("tests") or []):
        for s in t.get("input_series") or []:
            counts["expressions"] += 1
            check_expr(f"{rel(path)}: test {n} series", s["series"], counts)
        for a in t.get("alert_rule_test") or []:
            if a.get("alertname") not in names:
                P.add(rel(path), f"test {n} checks unknown alert {a.get('alertname')!r}")
        for q in t.get("promql_expr_test") or []:
            counts["expressions"] += 1
            check_expr(f"{rel(path)}: test {n} promql", q["expr"], counts)


def check_prometheus_config(path, doc):
    jobs = [j.get("job_name") for j in doc.get("scrape_configs") or []]
    if len(jobs) != len(set(jobs)):
        P.add(rel(path), f"duplicate job_name in {jobs}")
    if not any(j.get("kubernetes_sd_configs") for j in doc.get("scrape_configs") or []):
        P.add(rel(path), "no kubernetes_sd_configs job")
    if not any(j.get("static_configs") for j in doc.get("scrape_configs") or []):
        P.add(rel(path), "no static_configs job")
    for f in doc.get("rule_files") or []:
        if not (path.parent / f).exists():
            P.add(rel(path), f"rule_files entry {f!r} does not exist")


def grafana_queries(dash):
    """(where, expr) for every panel target, including panels nested in collapsed rows."""
    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))
    for p in walk(dash.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield p, t["expr"]


def substitute_grafana_vars(expr):
    expr = re.sub(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}|\$__range", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_grafana(path, dash, counts, promql_for_promtool):
    where = rel(path)
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        P.add(where, "schemaVersion missing or too old")
    for key in ("title", "uid", "panels", "templating"):
        if key not in dash:
            P.add(where, f"missing {key!r}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
    ds_vars = [n for n, v in variables.items() if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not ds_vars:
        P.add(where, "no Prometheus datasource variable")
    ids = []

    def check_ds(obj, what):
        ds = obj.get("datasource")
        if ds is None:
            return
        uid = ds.get("uid", "") if isinstance(ds, dict) else ds
        m = re.fullmatch(r"\$\{?(\w+)\}?", uid or "")
        if ds.get("type") != "grafana" and not (m and m.group(1) in ds_vars):
            P.add(where, f"{what}: datasource {ds!r} is not the datasource variable")

    def walk(panels):
        for p in panels or []:
            ids.append(p.get("id"))
            g = p.get("gridPos") or {}
            if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g.get("x", 0) + g.get("w", 0) > 24:
                P.add(where, f"panel {p.get('title')!r}: bad gridPos {g}")
            if p.get("type") != "row":
                check_ds(p, f"panel {p.get('title')!r}")
                if not p.get("targets"):
                    P.add(where, f"panel {p.get('title')!r} has no queries")
                for t in p.get("targets") or []:
                    check_ds(t, f"panel {p.get('title')!r} target {t.get('refId')}")
            walk(p.get("panels"))
    walk(dash.get("panels"))
    if len(ids) != len(set(ids)) or None in ids:
        P.add(where, "panel ids must be present and unique")
    for p, expr in grafana_queries(dash):
        counts["expressions"] += 1
        check_expr(f"{where}: panel {p.get('title')!r}", expr, counts)
        promql_for_promtool.append((f"{where}: panel {p.get('title')!r}", substitute_grafana_vars(expr)))
    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        check_ds(v, f"variable {name}")
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("definition") not in (None, q):
            P.add(where, f"variable {name}: definition {v['definition']!r} differs from its query {q!r}")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
        if not m:
            P.add(where, f"variable {name}: expected label_values(selector, label), got {q!r}")
            continue
        counts["expressions"] += 1
        check_expr(f"{where}: variable {name}", f"count by ({m.group(2)}) ({m.group(1)})", counts)


def check_wsgate_config(where, text):
    """Parses a wsgate.toml and returns (config dict or None)."""
    if tomllib is None:
        print(f"note: Python {sys.version.split()[0]} has no tomllib; skipped TOML checks for {where}")
        return None
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        P.add(where, f"TOML: {e}")
        return None
    pools = cfg.get("pool") or {}
    for r in cfg.get("route") or []:
        if r.get("pool") not in pools:
            P.add(where, f"route {r.get('name')!r} names unknown pool {r.get('pool')!r}")
    host_port = r"[A-Za-z0-9.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+"
    for name, pool in pools.items():
        if not pool.get("backends"):
            P.add(where, f"pool {name!r} has no backends")
        for b in pool.get("backends") or []:
            if ("addr" in b) == ("dns" in b):
                P.add(where, f"pool {name!r}: backend {b} needs exactly one of addr and dns")
                continue
            key = "addr" if "addr" in b else "dns"
            if not re.fullmatch(host_port, str(b[key])):
                P.add(where, f"pool {name!r}: backend {key} {b[key]!r} is not host:port")
            for k in ("resolve_every", "remove_after"):
                if k in b and (key != "dns" or duration_or_none(b[k]) is None):
                    P.add(where, f"pool {name!r}: backend {b[key]!r}: {k} needs a dns entry and a duration")
        spread = pool.get("drain_spread", DEFAULT_DRAIN_SPREAD)
        if spread != "none" and duration_or_none(spread) is None:
            P.add(where, f"pool {name!r}: drain_spread {spread!r} is neither a duration nor \"none\"")
        if pool.get("policy") == "sticky" and not pool.get("sticky"):
            P.add(where, f"pool {name!r}: policy sticky without a sticky key")
    if not cfg.get("listener"):
        P.add(where, "no [[listener]]")
    timeouts = cfg.get("timeouts") or {}
    drain = duration_or_none(timeouts.get("drain", DEFAULT_DRAIN))
    close_spread = duration_or_none(timeouts.get("close_spread", DEFAULT_CLOSE_SPREAD))
    if drain is None:
        P.add(where, "timeouts.drain is not a duration")
    if close_spread is None:
        P.add(where, "timeouts.close_spread is not a duration")
    elif drain is not None and close_spread > drain / 2:
        P.add(where, f"timeouts.close_spread {timeouts.get('close_spread')} is over half of timeouts.drain "
                     f"and is cut to {drain / 2:g}s: raise drain or lower close_spread")
    admin = cfg.get("admin") or {}
    for cidr in admin.get("allow") or []:
        try:
            ipaddress.ip_network(str(cidr), strict=True)
        except ValueError as e:
            P.add(where, f"admin.allow: {cidr!r}: {e}")
    if "token_file" in admin and not str(admin["token_file"]).strip():
        P.add(where, "admin.token_file is empty")
    return cfg


def duration_or_none(value):
    return parse_duration(str(value)) if isinstance(value, str) else None


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def drain_seconds(cfg):
    return duration_or_none((cfg.get("timeouts") or {}).get("drain", DEFAULT_DRAIN)) or 30


def prestop_sleep(container):
    """Seconds a container's preStop hook delays its SIGTERM: a sleep action or an exec of
    `sleep N`; 0 without a hook, None for a hook whose length cannot be told."""
    hook = (container.get("lifecycle") or {}).get("preStop")
    if not hook:
        return 0
    if "sleep" in hook:
        return (hook["sleep"] or {}).get("seconds")
    cmd = (hook.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and cmd[0].rsplit("/", 1)[-1] == "sleep":
        return duration_or_none(cmd[1]) if not cmd[1].isdigit() else int(cmd[1])
    return None


def pod_selected(selector, tpl):
    return bool(selector) and not (selector.items() - (tpl["metadata"].get("labels") or {}).items())


def check_dns_backends(cfg, where, services, deployments):
    """A pool's dns entries against the headless Services and backend Deployments here."""
    close_timeouts = {}
    for r in cfg.get("route") or []:
        ct = duration_or_none((r.get("websocket") or {}).get("close_timeout", DEFAULT_CLOSE_TIMEOUT)) or 2
        close_timeouts[r.get("pool")] = max(close_timeouts.get(r.get("pool"), 0), ct)
    for pname, pool in (cfg.get("pool") or {}).items():
        for b in pool.get("backends") or []:
            if "dns" not in b or not re.fullmatch(r"[A-Za-z0-9.\-]+:\d+", str(b["dns"])):
                continue
            host, port = str(b["dns"]).rsplit(":", 1)
            labels = host.rstrip(".").split(".")
            if len(labels) > 2 and labels[2] != "svc":
                continue  # not a cluster Service name
            svc = services.get(labels[0])
            if svc is None:
                print(f"note: {where}: pool {pname}: dns {b['dns']} names no Service in these manifests; "
                      "its timing is not checked")
                continue
            spath, svc = svc
            sw = f"{rel(spath)}: Service {labels[0]}"
            if svc["spec"].get("clusterIP") != "None":
                P.add(sw, f"must be headless (clusterIP: None) for pool {pname}'s dns discovery: "
                          "a cluster IP would be one backend")
            if svc["spec"].get("publishNotReadyAddresses"):
                P.add(sw, "publishNotReadyAddresses would keep terminating pods in DNS, so wsgate never drains them")
            dep = next(((p, d) for p, d in deployments
                        if pod_selected(svc["spec"].get("selector") or {}, d["spec"]["template"])), None)
            if dep is None:
                continue
            dpath, dep = dep
            dw = f"{rel(dpath)}: Deployment {dep['metadata']['name']}"
            pod = dep["spec"]["template"]["spec"]
            if int(port) not in {cp["containerPort"] for c in pod["containers"] for cp in c.get("ports", [])}:
                P.add(dw, f"pool {pname}'s dns port {port} is not a container port (a headless Service "
                          "does not map ports: DNS gives the pod's address)")
            spread = pool.get("drain_spread", DEFAULT_DRAIN_SPREAD)
            for c in pod["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", []) if "value" in e}
                for k, want in (("DRAIN_SPREAD", spread), ("POOL", pname), ("BACKEND_PORT", port)):
                    if k in env and str(env[k]) != str(want):
                        P.add(dw, f"container {c['name']}: {k}={env[k]!r} but pool {pname!r} has {want!r}")
            if spread == "none":
                continue  # the drain waits for the clients: no bound to check
            every = duration_or_none(b.get("resolve_every", DEFAULT_RESOLVE_EVERY)) or 10
            after = duration_or_none(b.get("remove_after", DEFAULT_REMOVE_AFTER)) or 30
            # wsgate times a resolution for the moment a missing record has been missing for
            # remove_after, so the drain starts then, not at the resolution after.
            need = (CLUSTER_DNS_DELAY + every + after + (duration_or_none(spread) or 0)
                    + close_timeouts.get(pname, 2))
            serving = [c for c in pod["containers"]
                       if int(port) in {cp["containerPort"] for cp in c.get("ports", [])}]
            sleeps = [prestop_sleep(c) for c in serving or pod["containers"]]
            sleep = max((s for s in sleeps if s is not None), default=0)
            if sleep < need:
                P.add(dw, f"preStop sleep {sleep}s is shorter than pool {pname}'s worst-case drain "
                          f"{need:g}s ({CLUSTER_DNS_DELAY}s DNS + {every:g}s + {after:g}s + "
                          f"drain_spread {spread} + close_timeout): clients would be cut, not moved")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= sleep:
                P.add(dw, f"terminationGracePeriodSeconds {grace} must exceed the preStop sleep {sleep}s")


def check_kubernetes(docs_by_file):
    docs = [(p, d) for p, ds in docs_by_file.items() for d in ds if isinstance(d, dict)]
    by_kind = {}
    for path, d in docs:
        if path.name == "kustomization.yaml":
            listed = set(d.get("resources") or [])
            for r in listed:
                if not (path.parent / r).exists():
                    P.add(rel(path), f"resource {r!r} does not exist")
            for other in sorted(path.parent.glob("*.y*ml")):
                if other.name != path.name and other.name not in listed:
                    P.add(rel(path), f"resources do not list {other.name}")
            continue
        if not (d.get("apiVersion") and d.get("kind") and (d.get("metadata") or {}).get("name")):
            P.add(rel(path), "document needs apiVersion, kind and metadata.name")
            continue
        by_kind.setdefault(d["kind"], []).append((path, d))

    configs = {}
    for path, cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            if key.endswith(".toml"):
                cfg = check_wsgate_config(f"{rel(path)}: {key}", text)
                if cfg is not None:
                    configs[cm["metadata"]["name"]] = cfg

    services = {svc["metadata"]["name"]: (p, svc) for p, svc in by_kind.get("Service", [])}
    deployments = by_kind.get("Deployment", [])
    for spath, svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector") or {}
        targets = [d for _, d in deployments if pod_selected(sel, d["spec"]["template"])]
        if not targets:
            P.add(rel(spath), f"Service {svc['metadata']['name']} selects the pods of no Deployment here")
            continue
        pod = targets[0]["spec"]["template"]["spec"]
        cports = [p for c in pod["containers"] for p in c.get("ports", [])]
        for sp in svc["spec"]["ports"]:
            tp = sp.get("targetPort", sp["port"])
            if tp not in ({p.get("name") for p in cports} if isinstance(tp, str) else {p["containerPort"] for p in cports}):
                P.add(rel(spath), f"Service {svc['metadata']['name']} targetPort {tp!r} is not a container port "
                                  f"of Deployment {targets[0]['metadata']['name']}")

    for path, dep in deployments:
        where = rel(path)
        tpl = dep["spec"]["template"]
        pod = tpl["spec"]
        if dep["spec"]["selector"]["matchLabels"].items() - tpl["metadata"]["labels"].items():
            P.add(where, "selector does not match the pod template labels")
        if not any(c["name"] == "wsgate" for c in pod["containers"]):
            continue  # a backend; checked against the pools that discover it (check_dns_backends)
        cm_names = {v["configMap"]["name"]: v["name"] for v in pod.get("volumes", []) if "configMap" in v}
        for cm in cm_names:
            if cm not in configs:
                P.add(where, f"mounts ConfigMap {cm!r}, which has no parsable wsgate config here")
        cfg = next((configs[c] for c in cm_names if c in configs), None)
        containers = {c["name"]: c for c in pod["containers"]}
        gw = containers.get("wsgate")
        if gw is None:
            P.add(where, "no container named wsgate")
            continue
        for c in pod["containers"]:
            for vm in c.get("volumeMounts", []):
                if vm["name"] in cm_names.values() and "subPath" in vm:
                    P.add(where, f"container {c['name']}: subPath mounts never receive ConfigMap updates")
        ports = {p.get("name"): p["containerPort"] for p in gw.get("ports", [])}
        if len(pod["containers"]) > 1 and not pod.get("shareProcessNamespace"):
            P.add(where, "a reloader sidecar needs shareProcessNamespace: true to signal wsgate")
        sc = {**pod.get("securityContext", {}), **gw.get("securityContext", {})}
        if not sc.get("runAsNonRoot") or not sc.get("readOnlyRootFilesystem"):
            P.add(where, "wsgate should run with runAsNonRoot and readOnlyRootFilesystem")
        if cfg is None:
            continue
        admin = port_of(cfg["admin"]["listen"])
        for probe, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = (gw.get(probe) or {}).get("httpGet") or {}
            port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") != path_ or port != admin:
                P.add(where, f"{probe} should GET {path_} on the admin port {admin}, has {get}")
        ann = tpl["metadata"].get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or str(ann.get("prometheus.io/port")) != str(admin):
            P.add(where, f"prometheus.io annotations should scrape the admin port {admin}")
        for lst in cfg.get("listener") or []:
            if port_of(lst["listen"]) not in ports.values():
                P.add(where, f"listener {lst['name']!r} port {port_of(lst['listen'])} is not a container port")
        if admin not in ports.values():
            P.add(where, f"admin port {admin} is not a container port")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        sleep = prestop_sleep(gw)
        if sleep is None:
            P.add(where, "wsgate's preStop hook should be a sleep (its length counts against the grace period)")
            sleep = 0
        if grace <= sleep + drain_seconds(cfg):
            P.add(where, f"terminationGracePeriodSeconds {grace} must exceed the preStop sleep {sleep}s "
                         f"plus the drain timeout {drain_seconds(cfg):g}s")
        token_file = (cfg.get("admin") or {}).get("token_file")
        if isinstance(token_file, str) and token_file.startswith("/"):
            d, f = token_file.rsplit("/", 1)
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            mount = next((vm for vm in gw.get("volumeMounts", []) if vm["mountPath"].rstrip("/") == d), None)
            src = (vols.get(mount["name"]) or {}) if mount else {}
            src = src.get("secret") or src.get("configMap")
            if src is None:
                P.add(where, f"admin.token_file {token_file} is not on a Secret volume mounted at {d}")
            elif src.get("items") and f not in {i["path"] for i in src["items"]}:
                P.add(where, f"admin.token_file {token_file}: the volume at {d} has no item {f!r}")
        check_dns_backends(cfg, f"{where} (config {next(iter(cm_names))})", services, deployments)


def check_systemd(path, drain):
    text = path.read_text()
    kv = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z]+)=(.*)", line)
        if m:
            kv.setdefault(m.group(1), []).append(m.group(2).strip())
    where = rel(path)
    for key, want in (("Type", "simple"), ("KillSignal", "SIGTERM"), ("Restart", "on-failure"),
                      ("LimitNOFILE", "1048576")):
        if kv.get(key, [None])[-1] != want:
            P.add(where, f"{key} should be {want}")
    if not any("kill -HUP $MAINPID" in v for v in kv.get("ExecReload", [])):
        P.add(where, "ExecReload should send SIGHUP to $MAINPID")
    stop = parse_duration(kv.get("TimeoutStopSec", ["90s"])[-1]) or float(kv.get("TimeoutStopSec", ["90"])[-1])
    if stop <= drain:
        P.add(where, f"TimeoutStopSec {stop}s must exceed the drain timeout {drain}s")


def check_dockerfile(path, cfg):
    text = path.read_text()
    where = rel(path)
    expose = {int(p) for line in re.findall(r"^EXPOSE\s+(.*)$", text, re.M) for p in line.split()}
    if cfg is not None:
        wanted = {port_of(cfg["admin"]["listen"])} | {port_of(l["listen"]) for l in cfg.get("listener") or []}
        if wanted - expose:
            P.add(where, f"EXPOSE {sorted(expose)} misses ports {sorted(wanted - expose)} of deploy/wsgate.toml")
    for needle in ('ENTRYPOINT ["wsgate"]', "/etc/wsgate/wsgate.toml", "cargo build --release --locked"):
        if needle not in text:
            P.add(where, f"expected {needle!r}")


# --------------------------------------------------------------------------------------
# promtool (optional)
# --------------------------------------------------------------------------------------
def run_promtool(rule_files, rule_tests, prom_configs, promql):
    promtool = shutil.which("promtool")
    if not promtool:
        print("note: promtool not on PATH; skipped promtool check rules/test rules/check config")
        return
    def run(args, where):
        r = subprocess.run([promtool, *args], capture_output=True, text=True)
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip()
            if "field kubernetes_sd_configs not found" in out:
                # Some distribution builds of Prometheus leave Kubernetes discovery out.
                print(f"note: this promtool has no Kubernetes service discovery; skipped check config {where}")
                return
            P.add(where, f"promtool {args[0]} {args[1]} failed:\n{out}")
    for f in rule_files:
        run(["check", "rules", str(f)], rel(f))
    for f in rule_tests:
        run(["test", "rules", str(f)], rel(f))
    for f in prom_configs:
        run(["check", "config", "--syntax-only", str(f)], rel(f))
    if promql:
        # promtool parses expressions only inside rule files: wrap every dashboard query.
        doc = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(promql)]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as tmp:
            yaml.safe_dump(doc, tmp)
        try:
            r = subprocess.run([promtool, "check", "rules", tmp.name], capture_output=True, text=True)
            if r.returncode != 0:
                P.add("dashboard queries", f"promtool could not parse them:\n{(r.stdout + r.stderr).strip()}")
        finally:
            os.unlink(tmp.name)


# --------------------------------------------------------------------------------------
def main():
    counts = {"files": 0, "expressions": 0, "metric references": 0}
    yaml_docs, json_docs = {}, {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in (".yml", ".yaml"):
            counts["files"] += 1
            try:
                yaml_docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            except yaml.YAMLError as e:
                P.add(rel(path), f"YAML: {e}")
        elif path.suffix == ".json":
            counts["files"] += 1
            try:
                json_docs[path] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                P.add(rel(path), f"JSON: {e}")

    default_cfg = None
    if (DEPLOY / "wsgate.toml").exists():
        counts["files"] += 1
        default_cfg = check_wsgate_config(rel(DEPLOY / "wsgate.toml"), (DEPLOY / "wsgate.toml").read_text())

    rule_files, rule_tests, prom_configs, promql = [], [], [], []
    alert_names_by_file, kube = {}, {}
    for path, docs in yaml_docs.items():
        for d in docs:
            if not isinstance(d, dict):
                continue
            if "groups" in d:
                names = set()
                check_rules_file(path, d, counts, names)
                alert_names_by_file[path.resolve()] = names
                rule_files.append(path)
            elif "scrape_configs" in d:
                check_prometheus_config(path, d)
                prom_configs.append(path)
            elif "tests" in d and "rule_files" in d:
                rule_tests.append(path)
            elif "apiVersion" in d or "kind" in d:
                kube.setdefault(path, []).append(d)
            else:
                P.add(rel(path), "unrecognised YAML document (not rules, tests, Prometheus config or Kubernetes)")
    for path in rule_tests:
        for d in yaml_docs[path]:
            check_rule_tests(path, d, counts, alert_names_by_file)
    for path, dash in json_docs.items():
        if isinstance(dash, dict) and "panels" in dash:
            check_grafana(path, dash, counts, promql)
    if not rule_files:
        P.add("deploy/", "no Prometheus rule file found")
    if not any("panels" in d for d in json_docs.values() if isinstance(d, dict)):
        P.add("deploy/", "no Grafana dashboard found")
    check_kubernetes(kube)

    unit = DEPLOY / "systemd" / "wsgate.service"
    if unit.exists():
        check_systemd(unit, drain_seconds(default_cfg) if default_cfg else 30)
    else:
        P.add(rel(unit), "missing")
    dockerfile = DEPLOY / "Dockerfile"
    if dockerfile.exists():
        check_dockerfile(dockerfile, default_cfg)
    else:
        P.add(rel(dockerfile), "missing")

    run_promtool(rule_files, rule_tests, prom_configs, promql)

    summary = (f"{counts['files']} files, {counts['expressions']} PromQL expressions, "
               f"{counts['metric references']} metric references")
    if P.items:
        print(f"validate.py: {len(P.items)} problem(s) ({summary}):", file=sys.stderr)
        for item in P.items:
            print(f"  - {item}", file=sys.stderr)
        return 1
    print(f"validate.py: OK ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
