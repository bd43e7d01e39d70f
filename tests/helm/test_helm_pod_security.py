"""The operator pod meets the Pod Security Standards "restricted" profile (baseline included).

The checks follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ control by
control; `restricted_violations` returns one line per broken control, so a failure says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chart_tools import Helm, Manifest, only, scenario_files

SCENARIOS = scenario_files()

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}
APPARMOR_OK = {"RuntimeDefault", "Localhost"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def restricted_violations(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every way a pod spec breaks the restricted profile; empty when it meets it."""
    bad: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"host namespaces: {field} is true")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("HostProcess: pod windowsOptions.hostProcess is true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            bad.append(f"hostPath volume {volume['name']}")
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {volume['name']} has a type outside the restricted set: {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"unsafe sysctl {sysctl['name']}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            bad.append(f"AppArmor annotation {key}={value}")
    bad += _security_context_violations("pod", pod_sc, pod_level=True)

    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for container in _containers(pod):
        name = f"container {container['name']}"
        sc = container.get("securityContext") or {}
        bad += _security_context_violations(name, sc, pod_level=False)
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount {sc['procMount']}")
        if sc.get("runAsNonRoot") is False or not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot must be true (on the pod or the container)")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in SECCOMP_OK:
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, is {seccomp}")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
    return bad


def _security_context_violations(where: str, sc: dict[str, Any], *, pod_level: bool) -> list[str]:
    """The controls that apply alike to the pod's and each container's securityContext."""
    bad: list[str] = []
    if sc.get("runAsUser") == 0:
        bad.append(f"{where}: runAsUser is 0")
    if not pod_level and (sc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append(f"{where}: windowsOptions.hostProcess is true")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        bad.append(f"{where}: seLinuxOptions {selinux}")
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        bad.append(f"{where}: seccompProfile Unconfined")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in APPARMOR_OK:
        bad.append(f"{where}: appArmorProfile {apparmor}")
    return bad


def _pod(objects: list[Manifest]) -> tuple[dict[str, Any], dict[str, str]]:
    template = only(objects, "Deployment")["spec"]["template"]
    return template["spec"], template["metadata"].get("annotations", {})


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_operator_pod_meets_the_restricted_profile(rendered: Callable[[Path], list[Manifest]],
                                                   scenario: Path) -> None:
    pod, annotations = _pod(rendered(scenario))
    assert restricted_violations(pod, annotations) == []


def test_operator_root_filesystem_is_read_only(rendered: Callable[[Path], list[Manifest]]) -> None:
    pod, _ = _pod(rendered(scenario_files()[0]))
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_a_weakened_security_context_is_caught(helm: Helm) -> None:
    objects = helm.render(sets=["securityContext.allowPrivilegeEscalation=true",
                                "securityContext.capabilities.drop=null", "podSecurityContext.runAsNonRoot=false",
                                "securityContext.runAsNonRoot=null", "securityContext.seccompProfile=null",
                                "podSecurityContext.seccompProfile.type=Unconfined"])
    found = "\n".join(restricted_violations(*_pod(objects)))
    for control in ("allowPrivilegeEscalation", "drop ALL", "runAsNonRoot", "seccompProfile"):
        assert control in found


def test_the_checker_catches_each_baseline_control() -> None:
    pod = {
        "hostNetwork": True, "hostPID": True, "hostIPC": True,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                            "sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}, {"name": "nfs", "nfs": {"server": "x", "path": "/"}}],
        "containers": [{
            "name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {"privileged": True, "allowPrivilegeEscalation": False, "runAsUser": 0,
                                "procMount": "Unmasked", "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                                "seLinuxOptions": {"type": "spc_t"}, "appArmorProfile": {"type": "Unconfined"}},
        }],
    }
    found = "\n".join(restricted_violations(pod, {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}))
    for control in ("hostNetwork", "hostPID", "hostIPC", "unsafe sysctl", "hostPath volume", "volume nfs",
                    "hostPort", "privileged", "runAsUser is 0", "procMount", "SYS_ADMIN", "seLinuxOptions",
                    "appArmorProfile", "AppArmor annotation"):
        assert control in found, f"{control} not reported in:\n{found}"
