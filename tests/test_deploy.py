"""serve/deploy/: Prometheus rules and config, the Grafana dashboard and the Kubernetes manifests.

Offline: promtool checks the rules and runs their unit tests (alerts_test.yml), every manifest
is validated against the Kubernetes 1.33 schemas, and the manifests are read for what a schema
cannot see (probes on the service's health routes, a grace period that covers the drain,
selectors that match the pods).  Every metric the rules, the adapter and the dashboard name
must be one the service exports.  At the end, a real Prometheus scrapes a real ``bentoml serve``.

promtool and prometheus come from PATH, else from .tools/usr/bin, else from Debian's
``prometheus`` package unpacked there without root (``apt-get download`` + ``dpkg -x``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "serve" / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "trimserve.json"
K8S = DEPLOY / "k8s"
TOOLS = REPO / ".tools"
KUBERNETES_VERSION = "1.33"
PORT = 3000  # bentoml serve's default, the containerPort
APP = {"app.kubernetes.io/name": "trimserve"}
PROBES = {"livenessProbe": ("/livez",), "readinessProbe": ("/readyz",), "startupProbe": ("/readyz", "/livez")}
SEVERITIES = {"critical", "warning", "info"}
# BentoML's own series (bentoml/_internal/server/http/instruments.py, _bentoml_impl/server/app.py).
BENTOML_METRICS = {
    "bentoml_service_request_total",
    "bentoml_service_request_in_progress",
    "bentoml_service_last_request_timestamp_seconds",
    *(
        f"bentoml_service_{h}_{s}"
        for h in ("request_duration_seconds", "adaptive_batch_size")
        for s in ("bucket", "sum", "count")
    ),
}
# A metric name, not the middle of a recording rule's name (job:trimserve_x:rate5m).
METRIC = re.compile(r"(?<![\w:])(?:trimserve|bentoml)_\w+")
RECORDED = re.compile(r"\b\w+:\w+:\w+\b")


# --- promtool and prometheus -------------------------------------------------------------


# --- Prometheus rules --------------------------------------------------------------------


def _rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [g["name"] for g in groups] == ["trimserve"]
    return groups[0]["rules"]


def test_rules_pass_promtool_check(prom):
    result = prom.run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(prom):
    result = prom.run("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_tested_both_ways():
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert len(alerts) >= 7
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], name
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == name]
        assert True in outcomes and False in outcomes, f"{name}: needs a firing and a silent case in {RULES_TEST.name}"


def test_rule_unit_tests_catch_a_wrong_threshold(prom, tmp_path):
    broken = RULES.read_text().replace(
        "job:trimserve_classify_errors:ratio_rate5m > 0.01", "job:trimserve_classify_errors:ratio_rate5m > 0.05"
    )
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULES_TEST, tmp_path)
    result = prom.run("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0 and "TrimserveHighErrorRate" in result.stdout + result.stderr


def _kubernetes_job(config: dict) -> dict:
    return next(job for job in config["scrape_configs"] if "kubernetes_sd_configs" in job)


def test_prometheus_config_passes_promtool_check(prom, tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # Debian's build leaves out Kubernetes discovery; check that job's relabelling on a static target.
    job = _kubernetes_job(config)
    job["static_configs"] = [{"targets": ["10.0.0.1:3000"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / PROMETHEUS_CONFIG.name).write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path)
    result = prom.run("check", "config", str(tmp_path / PROMETHEUS_CONFIG.name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_labels_what_the_rules_and_the_adapter_select():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    assert any(job["job_name"] == "trimserve" and job.get("static_configs") for job in config["scrape_configs"])
    relabels = _kubernetes_job(config)["relabel_configs"]
    assert {"target_label": "job", "replacement": "trimserve"} in relabels
    targets = {r.get("target_label") for r in relabels}
    resources = _adapter_rule(_manifests())["resources"]["overrides"]
    assert set(resources) <= targets, f"prometheus-adapter maps {sorted(resources)}; the scrape sets {sorted(targets)}"


# --- Kubernetes manifests ----------------------------------------------------------------


def _manifests() -> dict[str, list[dict]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc] for path in sorted(K8S.glob("*.yaml"))
    }


def _one(manifests: dict, file: str, kind: str) -> dict:
    docs = [doc for doc in manifests.get(file, []) if doc["kind"] == kind]
    assert len(docs) == 1, f"{file}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _container(m: dict) -> dict:
    return _one(m, "deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _adapter_rule(manifests: dict) -> dict:
    config = yaml.safe_load(_one(manifests, "prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"])
    assert len(config["rules"]) == 1
    return config["rules"][0]


@pytest.mark.parametrize("file", sorted(path.name for path in K8S.glob("*.yaml")))
def test_manifest_is_valid_kubernetes(file):
    for doc in yaml.safe_load_all((K8S / file).read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * units.get(unit, 1)


def _cores(quantity: str) -> float:
    quantity = str(quantity)
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _pre_stop_seconds(container: dict) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    match = re.fullmatch(r"(?:sh -c )?sleep (\d+)", " ".join(pre_stop.get("exec", {}).get("command", [])))
    return float(match[1]) if match else None


def _probe_problems(container: dict, ports: dict) -> list[str]:
    problems = []
    for probe, paths in PROBES.items():
        get = container.get(probe, {}).get("httpGet", {})
        if ports.get(get.get("port"), get.get("port")) != PORT or get.get("path") not in paths:
            problems.append(f"{probe}: expected GET {' or '.join(paths)} on port {PORT}, found {get or 'none'}")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 60:
        problems.append("startupProbe: allow at least 60 s (periodSeconds x failureThreshold) for the model to load")
    return problems


def _pod_problems(deployment: dict) -> list[str]:
    from serve.config import PREFIX, ServeConfig

    pod = deployment["spec"]["template"]
    spec, labels = pod["spec"], pod["metadata"].get("labels", {})
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    problems = _probe_problems(container, ports)
    if PORT not in ports.values():
        problems.append(f"containerPort {PORT} missing")
    if not APP.items() <= labels.items() or not deployment["spec"]["selector"]["matchLabels"].items() <= labels.items():
        problems.append(f"pod labels {labels} must include {APP} and the Deployment's selector")
    fields = {PREFIX + f.name.upper() for f in dataclasses.fields(ServeConfig)}
    problems += [
        f"env {name} is not a ServeConfig setting" for name in env if name.startswith(PREFIX) and name not in fields
    ]

    timeout = float(env.get("TRIMSERVE_TIMEOUT_S") or ServeConfig.timeout_s)
    sleep, grace = _pre_stop_seconds(container), spec.get("terminationGracePeriodSeconds", 30)
    if sleep is None:
        problems.append("preStop: expected a sleep so endpoint removal propagates before SIGTERM")
    elif grace < sleep + timeout + 5:
        problems.append(
            f"terminationGracePeriodSeconds={grace} < preStop {sleep:g} s + TRIMSERVE_TIMEOUT_S "
            f"{timeout:g} s + 5 s margin: in-flight requests would be killed"
        )

    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if not {"cpu", "memory"} <= requests.keys() or "memory" not in limits:
        problems.append(f"resources: expected requests cpu+memory and limits.memory, found {resources}")
    elif _bytes(limits["memory"]) < _bytes(requests["memory"]):
        problems.append(f"resources: limits.memory {limits['memory']} < requests.memory {requests['memory']}")
    elif "cpu" in limits and _cores(limits["cpu"]) < _cores(requests["cpu"]):
        problems.append(f"resources: limits.cpu {limits['cpu']} < requests.cpu {requests['cpu']}")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}

    def volume_of(path: str) -> dict:
        mount = next((m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")), None)
        return {} if mount is None or "subPath" in mount else volumes.get(mount["name"], {})

    keys = env.get("TRIMSERVE_API_KEYS_FILE") or ""
    if volume_of(keys).get("secret", {}).get("secretName") != "trimserve-api-keys":
        problems.append(
            f"TRIMSERVE_API_KEYS_FILE={keys!r} must lie in a directory mount (no subPath: it would "
            "never see updates) of the Secret trimserve-api-keys"
        )
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        home = (env.get("BENTOML_HOME") or "/home/bentoml").rstrip("/") + "/"
        if "emptyDir" not in volume_of(home):
            problems.append(
                f"readOnlyRootFilesystem: BENTOML_HOME={home!r} must be on an emptyDir, BentoML writes there"
            )
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(PORT):
        problems.append(f"pod annotations: expected prometheus.io/scrape 'true' and port '{PORT}', found {annotations}")
    return problems


def check_manifests(manifests: dict[str, list[dict]]) -> list[str]:
    """What is wrong with the manifests as a whole; [] when they fit the service and each other."""
    deployment = _one(manifests, "deployment.yaml", "Deployment")
    name, pod_labels = deployment["metadata"]["name"], deployment["spec"]["template"]["metadata"].get("labels", {})
    ports = {p.get("name"): p["containerPort"] for p in _container(manifests)["ports"]}
    problems = _pod_problems(deployment)

    service = _one(manifests, "service.yaml", "Service")
    if not service["spec"].get("selector") or not service["spec"]["selector"].items() <= pod_labels.items():
        problems.append(f"Service selector {service['spec'].get('selector')} does not select the pods {pod_labels}")
    if [(p["port"], ports.get(p["targetPort"], p["targetPort"])) for p in service["spec"]["ports"]] != [(80, PORT)]:
        problems.append(f"Service: expected port 80 -> {PORT}, found {service['spec']['ports']}")

    pdb = _one(manifests, "pdb.yaml", "PodDisruptionBudget")
    if not pdb["spec"]["selector"].get("matchLabels", {}).items() <= pod_labels.items() or not pdb["spec"]["selector"]:
        problems.append(f"PodDisruptionBudget selector {pdb['spec']['selector']} does not select the pods {pod_labels}")

    for file in ("hpa.yaml", "hpa-custom-metric.yaml"):
        hpa = _one(manifests, file, "HorizontalPodAutoscaler")
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) != ("Deployment", name):
            problems.append(f"{file}: scaleTargetRef {target} is not the Deployment {name!r}")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append(f"{file}: minReplicas below 2 leaves no pod while the PodDisruptionBudget lets one go")

    custom = _one(manifests, "hpa-custom-metric.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"]
    wanted = {m["pods"]["metric"]["name"] for m in custom if m["type"] == "Pods"}
    served = _adapter_rule(manifests)["name"]["as"]
    if wanted != {served}:
        problems.append(f"hpa-custom-metric.yaml asks for {sorted(wanted)}; prometheus-adapter serves {served!r}")

    for file, docs in manifests.items():
        for doc in docs:
            if doc["kind"] != "ConfigMap" and not APP.items() <= doc["metadata"].get("labels", {}).items():
                problems.append(f"{file}: {doc['kind']} lacks the label {APP}")
    return problems


def test_manifests_fit_the_service_and_each_other():
    assert check_manifests(_manifests()) == []


def _set(path: str, value):
    """A change to one manifest: ``file/key/key/...`` (an int key indexes a list)."""
    file, *keys = path.split("/")

    def apply(m):
        node = m[file][0]
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value

    return apply


MISTAKES = {
    "liveness on the wrong path": (
        lambda m: _container(m)["livenessProbe"]["httpGet"].update(path="/healthz"),
        "livenessProbe: expected GET /livez",
    ),
    "readiness on the wrong port": (
        lambda m: _container(m)["readinessProbe"]["httpGet"].update(port=8080),
        "readinessProbe: expected GET /readyz on port 3000",
    ),
    "grace shorter than the drain": (
        _set("deployment.yaml/spec/template/spec/terminationGracePeriodSeconds", 12),
        "terminationGracePeriodSeconds=12 < preStop 5 s",
    ),
    "no preStop": (lambda m: _container(m).pop("lifecycle"), "preStop: expected a sleep"),
    "memory limit under the request": (
        lambda m: _container(m)["resources"]["limits"].update(memory="256Mi"),
        "limits.memory 256Mi < requests.memory",
    ),
    "keys through a subPath": (
        lambda m: _container(m)["volumeMounts"][0].update(subPath="keys"),
        "TRIMSERVE_API_KEYS_FILE='/etc/trimserve/keys' must lie in a directory mount",
    ),
    "unknown setting": (
        lambda m: _container(m)["env"].append({"name": "TRIMSERVE_TIMEOUT", "value": "5"}),
        "env TRIMSERVE_TIMEOUT is not a ServeConfig setting",
    ),
    "Service selects other pods": (
        _set("service.yaml/spec/selector", {"app": "trimserve"}),
        "Service selector {'app': 'trimserve'} does not select the pods",
    ),
    "PDB selects other pods": (
        _set("pdb.yaml/spec/selector/matchLabels", {"app.kubernetes.io/name": "other"}),
        "PodDisruptionBudget selector",
    ),
    "HPA scales something else": (
        _set("hpa.yaml/spec/scaleTargetRef/name", "trimserve-old"),
        "hpa.yaml: scaleTargetRef",
    ),
    "HPA asks for a metric nobody serves": (
        _set("hpa-custom-metric.yaml/spec/metrics/0/pods/metric/name", "trimserve_rps"),
        "hpa-custom-metric.yaml asks for ['trimserve_rps']; prometheus-adapter serves 'trimserve_requests_per_second'",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_manifest_checks_catch_a_mistake(mistake):
    manifests = copy.deepcopy(_manifests())
    change, message = MISTAKES[mistake]
    change(manifests)
    problems = check_manifests(manifests)
    assert any(message in problem for problem in problems), problems


# --- metric names --------------------------------------------------------------------------


def _rule_exprs() -> list[str]:
    return [rule["expr"] for rule in _rules()]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # A variable's label_values(<selector>, <label>) is Grafana's; the selector inside is PromQL.
    return exprs + [
        re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", v["query"]["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]


def _adapter_exprs() -> list[str]:
    rule = _adapter_rule(_manifests())
    return [rule["seriesQuery"], rule["name"]["matches"].strip("^$"), rule["metricsQuery"]]


def _exported_metrics() -> set[str]:
    """Every series name trimserve's /metrics can show: serve.metrics' objects plus BentoML's."""
    from prometheus_client import REGISTRY

    import serve.metrics  # noqa: F401  (registers trimserve's objects)

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "info": ("_info",),
    }
    return BENTOML_METRICS | {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("trimserve_")
        for suffix in suffixes.get(family.type, ("",))
    }


@pytest.mark.parametrize("source", ["alerts.yml", "prometheus-adapter-rules.yaml", "trimserve.json"])
def test_only_metrics_the_service_exports(source):
    exprs = {
        "alerts.yml": _rule_exprs,
        "prometheus-adapter-rules.yaml": _adapter_exprs,
        "trimserve.json": _dashboard_exprs,
    }[source]()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used, source
    assert sorted(used - _exported_metrics()) == [], f"{source} uses metrics serve/metrics.py does not define"


def test_recording_rules_used_are_defined():
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = {name for expr in _rule_exprs() for name in RECORDED.findall(expr)}
    assert used and used <= recorded


def _dashboard_as_rules(exprs: list[str]) -> dict:
    plain = [e.replace("$__rate_interval", "1m").replace("$job", "trimserve").replace("$instance", ".*") for e in exprs]
    return {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}:x", "expr": e} for i, e in enumerate(plain)],
            }
        ]
    }


def test_dashboard_queries_parse_and_panels_use_the_datasource_variable(prom, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        for item in (panel, *panel.get("targets", [])):
            assert item.get("datasource", {"uid": "${DS_PROMETHEUS}"})["uid"] == "${DS_PROMETHEUS}", panel["title"]
    # promtool parses PromQL offline when it is handed the queries as recording rules.
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(_dashboard_as_rules(_dashboard_exprs())))
    result = prom.run("check", "rules", str(tmp_path / "dashboard.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a real service ----------------------------------------------


def _query(url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _wait_for(what: str, probe, timeout_s: float = 30):
    """``probe()`` until it returns something truthy; fails with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def _value(url: str, expr: str) -> float | None:
    result = _query(url, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def variant(served_variant, tiny_fp32) -> tuple[Path, Path]:
    """The onnx-fp32 variant's directory and its manifest."""
    return served_variant[3], tiny_fp32 / "manifest.json"


@pytest.mark.slow
def test_prometheus_scrapes_the_service_and_loads_the_rules(prom, variant, tmp_path):
    from serve.launch import ServerProcess, free_port

    directory, manifest = variant
    key = "tk-deploy-test"
    server = ServerProcess(
        {"TRIMSERVE_VARIANT_DIR": str(directory), "TRIMSERVE_MANIFEST": str(manifest), "TRIMSERVE_API_KEYS": key},
        log=tmp_path / "server.log",
    )
    prometheus = None
    try:
        server.wait_ready()
        # The example config's static job, pointed at this server; namespace and pod as the
        # Kubernetes job would set them, so the adapter's query finds its series.
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        [job] = [j for j in config["scrape_configs"] if j["job_name"] == "trimserve"]
        job["static_configs"] = [
            {"targets": [server.url.removeprefix("http://")], "labels": {"namespace": "test", "pod": "trimserve-0"}}
        ]
        config.update(scrape_configs=[job], rule_files=[str(RULES)])
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{free_port()}"
        with (tmp_path / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    str(prom.prometheus),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready():
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for("prometheus /-/ready", ready)

        texts = ["A masterpiece: moving, funny and beautifully acted.", "Awful, awful, awful."]
        for _ in range(5):
            response = httpx.post(
                f"{server.url}/classify", json={"texts": texts}, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            assert response.status_code == 200, response.text
        assert httpx.post(f"{server.url}/classify", json={"texts": texts}, timeout=30).status_code == 401

        _wait_for(
            "10 predictions in Prometheus",
            lambda: _value(url, 'sum(trimserve_predictions_total{job="trimserve"})') == 10,
        )
        _wait_for(
            "5 + 1 requests by code",
            lambda: (
                _value(url, 'trimserve_requests_total{code="200"}') == 5
                and _value(url, 'trimserve_requests_total{code="401"}') == 1
            ),
        )
        assert _value(url, 'up{job="trimserve"}') == 1 and _value(url, "trimserve_ready") == 1
        variants = _query(url, "trimserve_model_info")
        assert [r["metric"]["variant"] for r in variants] == ["onnx-fp32"]

        # The adapter's query, rendered as prometheus-adapter would for the HPA's pod.
        rule = _adapter_rule(_manifests())
        adapter = (
            rule["metricsQuery"]
            .replace("<<.GroupBy>>", "namespace, pod")
            .replace("<<.Series>>", "trimserve_requests_total")
            .replace("<<.LabelMatchers>>", 'namespace="test", pod="trimserve-0"')
        )
        assert [r["metric"] for r in _wait_for("the adapter's series", lambda: _query(url, adapter))] == [
            {"namespace": "test", "pod": "trimserve-0"}
        ]

        def rules_evaluated():
            groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in groups if g["name"] == "trimserve" for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = _wait_for("every trimserve rule evaluated with health ok", rules_evaluated)
        assert len(rules) == len(_rules())
        active = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
        assert active <= {"TrimserveNoTraffic"}, active
        # Everything the rules and the dashboard read is there once the service has had traffic.
        names = set(httpx.get(f"{url}/api/v1/label/__name__/values", timeout=5).json()["data"])
        used = {n for expr in _rule_exprs() + _dashboard_exprs() + _adapter_exprs() for n in METRIC.findall(expr)}
        assert sorted(used - names) == []
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(20)
        server.stop()
