"""deploy/ checked: the Kustomize manifests render (``kubectl kustomize``) and validate strictly
against the Kubernetes 1.31 schemas (kubernetes-validate); what they wire together agrees (the
probe paths and ports, the data directory, the secret for the database URL); the systemd units
pass ``systemd-analyze verify`` and its offline security review; every command line in the
units, manifests and container files parses with the real CLI; the container files are
multi-stage with a pinned base and a non-root final stage; the device lock file pins every base
dependency and no control-plane or planner one."""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from edgewise.cli.common import EXIT_DECOMMISSIONED
from edgewise.cli.main import main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
KUBE_VERSION = "1.31.0"
KUSTOMIZATIONS = ("control-plane", "control-plane-postgres", "agent")
CLI = Path(sys.executable).parent / "edgewise"


def parse_cli(args: list[str]) -> click.Context:
    """Parse ``edgewise ARGS`` down to the command the way click does when run, without
    running anything; raises click's usage errors."""
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args (9.0: all in args)
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = main.make_context("edgewise", list(args))
        cmd: click.Command = main
        rest = ctx.protected_args + ctx.args
        while isinstance(cmd, click.Group) and rest:
            name, *rest = rest
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"no command {name!r} in {args}"
            ctx = sub.make_context(name, rest, parent=ctx)
            cmd = sub
            rest = (ctx.protected_args + ctx.args) if isinstance(cmd, click.Group) else []
    return ctx


def render(name: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # no kustomize here: the files one by one
        if not (K8S / name / "namespace.yaml").exists():
            pytest.skip(f"{name} is an overlay: rendering it needs kubectl (not installed)")
        docs = []
        for path in sorted((K8S / name).glob("*.yaml")):
            if path.name != "kustomization.yaml":
                docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        return docs
    out = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_validate(name: str) -> None:
    docs = render(name)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == {"control-plane": ["Deployment", "Namespace", "PersistentVolumeClaim",
                                       "Service"],
                     "control-plane-postgres": ["Deployment", "Namespace",
                                                "PersistentVolumeClaim", "Service"],
                     "agent": ["DaemonSet", "Namespace"]}[name]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # the validation can fail: a misspelt field is refused
    bad = copy.deepcopy(next(d for d in docs if d["kind"] in ("Deployment", "DaemonSet")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_kustomize_renders_with_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the manifests were validated file by file")
    docs = render("control-plane")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "edgewise"}
    dep = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/edgewise-cloud:0.1.0")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def hardened(pod: dict[str, Any], c: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}


def test_control_plane_wiring() -> None:
    docs = render("control-plane")
    dep, svc, pvc = (by_kind(docs, k) for k in ("Deployment", "Service",
                                                "PersistentVolumeClaim"))
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    hardened(pod, c)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https",
                                              "scheme": "HTTPS"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"] == [{"name": "https", "containerPort": 8443}]
    ctx = parse_cli(c["args"])
    assert (ctx.command.name, ctx.params["port"], ctx.params["host"]) == ("serve", 8443,
                                                                           "0.0.0.0")
    data = ctx.params["data_dir"]
    # on the volume, one level below its root (which the process may not chmod to 0700)
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[str(data.parent)] == "data"
    (vol,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "https"
    assert by_kind(docs, "Namespace")["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"


def test_postgres_overlay_takes_the_url_from_a_secret() -> None:
    c = container(by_kind(render("control-plane-postgres"), "Deployment"))
    env = {e["name"]: e for e in c["env"]}
    assert env["EDGEWISE_DB"]["valueFrom"] == {"secretKeyRef": {"name": "edgewise-db",
                                                                "key": "url"}}
    assert env["EDGEWISE_LOG_FORMAT"]["value"] == "json"  # the base's env is kept
    assert not any("postgres" in a or "--db" in a for a in c["args"])
    # and `cloud serve` reads it from there
    (db,) = [p for p in parse_cli(c["args"]).command.params if p.name == "db"]
    assert db.envvar == "EDGEWISE_DB"


def test_agent_daemonset_wiring() -> None:
    docs = render("agent")
    ds = by_kind(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    hardened(pod, c)
    assert c["args"][:2] == ["agent", "launch"]
    ctx = parse_cli(c["args"])
    assert ctx.command.name == "launch"
    data = str(ctx.params["data_dir"])
    passed = dict(a.removeprefix("--").split("=", 1) for a in ctx.args)  # to `agent run`
    run = parse_cli(["agent", "run", "--data", data, *ctx.args])
    assert run.params["metrics"] == passed["metrics"] == "0.0.0.0:9464"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts[data]]["hostPath"] == {"path": "/var/lib/edgewise/agent",
                                              "type": "DirectoryOrCreate"}
    assert Path(passed["ca"]).parent.as_posix() in mounts
    assert vols[mounts[Path(passed["ca"]).parent.as_posix()]]["configMap"]["name"] == (
        "edgewise-ca")
    (init,) = pod["initContainers"]
    assert init["command"] == ["chown", "10001:10001", data]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    env = {e["name"]: e for e in c["env"]}
    assert env["EDGEWISE_ENROL_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


# -- systemd ------------------------------------------------------------------------------------

UNITS = ("edgewise-agent.service", "edgewise-cloud.service")


def unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def exec_args(name: str) -> list[str]:
    """ExecStart's arguments after the program, the default EDGEWISE_*_ARGS expanded."""
    u = unit(name)
    env = dict(shlex.split(e)[0].split("=", 1) for e in u["Environment"])
    argv = shlex.split(u["ExecStart"][0])
    assert argv[0] == "/opt/edgewise/venv/bin/edgewise"
    out: list[str] = []
    for a in argv[1:]:
        out += env[a[1:]].split() if a.startswith("$") else [a]
    return out


def test_units_run_what_the_cli_takes() -> None:
    agent = parse_cli(exec_args("edgewise-agent.service"))
    assert agent.command.name == "launch"
    run = parse_cli(["agent", "run", "--data", "x", *agent.args])
    assert run.params["metrics"] == "127.0.0.1:9464"
    cloud = parse_cli(exec_args("edgewise-cloud.service"))
    assert (cloud.command.name, cloud.params["host"], cloud.params["port"]) == (
        "serve", "0.0.0.0", 8443)
    # a decommissioned node exits 4: systemd must not start it again
    assert unit("edgewise-agent.service")["RestartPreventExitStatus"] == [
        str(EXIT_DECOMMISSIONED)]
    assert unit("edgewise-cloud.service")["StandardOutput"] == ["null"]  # the admin token
    for name in UNITS:
        u = unit(name)
        assert u["User"] == ["edgewise"] and u["NoNewPrivileges"] == ["yes"]
        assert u["ProtectSystem"] == ["strict"] and u["CapabilityBoundingSet"] == [""]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_verify_and_security(name: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run does)")
    # verify checks that ExecStart's program exists: point it at this environment's
    text = (DEPLOY / "systemd" / name).read_text()
    assert CLI.exists()
    (tmp_path / name).write_text(text.replace("/opt/edgewise/venv/bin/edgewise", str(CLI)))
    res = subprocess.run([tool, "verify", str(tmp_path / name)], capture_output=True,
                         text=True, timeout=60)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    res = subprocess.run([tool, "security", "--offline=yes", "--no-pager",
                          str(tmp_path / name)], capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert level is not None, res.stdout + res.stderr
    assert float(level.group(1)) <= 2.0, res.stdout  # "OK" on systemd's scale (0 to 10)


# -- container files ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "command"), [("agent.Dockerfile", "launch"),
                                               ("cloud.Dockerfile", "serve")])
def test_container_files(name: str, command: str) -> None:
    text = (DEPLOY / "container" / name).read_text()
    logical = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    lines = [ln.strip() for ln in logical.splitlines() if ln.strip() and
             not ln.lstrip().startswith("#")]
    base = re.search(r"^ARG BASE=(\S+)$", logical, re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?",
                        base.group(1))
    froms = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")]
    assert [lines[i] for i in froms] == ["FROM ${BASE} AS build", "FROM ${BASE}"]
    final = lines[froms[1]:]
    assert not any(re.search(r"apt-get|apk |gcc|build-essential|COPY (src|\.) ", ln)
                   for ln in final), final
    assert any("pip uninstall -y -q pip setuptools wheel" in ln for ln in final)
    assert "COPY --from=build /opt/edgewise /opt/edgewise" in final
    assert "USER 10001:10001" in final
    assert final.index("USER 10001:10001") > max(i for i, ln in enumerate(final)
                                                 if ln.startswith("RUN "))
    entry = yaml.safe_load(next(ln for ln in final if ln.startswith("ENTRYPOINT "))[11:])
    cmd = yaml.safe_load(next(ln for ln in final if ln.startswith("CMD "))[4:])
    assert entry == ["edgewise"]
    assert parse_cli(cmd).command.name == command


def test_constraints_pin_the_base_install_only() -> None:
    pins = {}
    for line in (DEPLOY / "constraints-edge.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    base = [Requirement(r) for r in importlib.metadata.requires("edgewise") or []]
    base = [r for r in base if r.marker is None]
    assert len(base) >= 10
    for req in base:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in deploy/constraints-edge.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    for heavy in ("sqlalchemy", "alembic", "asyncpg", "aiosqlite", "matplotlib", "nats-py",
                  "paho-mqtt", "pymodbus", "asyncua"):
        assert heavy not in pins
