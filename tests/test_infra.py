"""infra/: every manifest parses and validates against its schema (KubeRay CRDs from the reference data's kuberay/, the
Kubernetes schemas of `kubernetes-validate`, Ray's cluster-launcher schema), entrypoints name files and flags that
exist (parsed by the jobs' own parsers), and the local scheduled-run script proves the incremental story end to end."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import refs_or_skip

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in _docs(p)]


def _crd_schema(kind: str) -> dict[str, Any]:
    name = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    path = refs_or_skip(f"kuberay/{name}") / "kuberay" / name  # skips, or fails under SRBATCH_REQUIRE_REFS=1
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden: Kubernetes prunes fields a structural schema does not declare,
    silently, so a misspelt field would just vanish; here it is an error."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):  # fmt: skip
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


def _validate_crd(doc: dict[str, Any]) -> None:
    import jsonschema

    schema = _crd_schema(doc["kind"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_every_infra_yaml_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob-upscale.yaml", "rayjob-train.yaml",
                                       "cronjob-upscale.yaml", "aws-gpu.yaml"}  # fmt: skip
    for p in files:
        assert _docs(p), p


@pytest.mark.refs
def test_raycluster_and_rayjobs_validate_against_the_kuberay_crds() -> None:
    kinds = []
    for path, doc in _all_manifests():
        if doc["apiVersion"] == "ray.io/v1":
            _validate_crd(doc)
            kinds.append(doc["kind"])
    # the RayJob template inside the CronJob's ConfigMap too, placeholders filled in as the CronJob does
    cm = next(d for _, d in _all_manifests() if d["kind"] == "ConfigMap")
    template = cm["data"]["rayjob.yaml"].replace("__NAME__", "srbatch-upscale-20261123-0600")
    template = template.replace("__RUN_ID__", "2026-11-23T06-00Z")
    _validate_crd(yaml.safe_load(template))
    assert sorted(kinds) == ["RayCluster", "RayJob", "RayJob"]
    # the strict schema does catch a misspelt field
    bad = copy.deepcopy(next(d for _, d in _all_manifests() if d["kind"] == "RayJob"))
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        _validate_crd(bad)


def test_cluster_shape_and_secrets() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _all_manifests()}
    rc = docs[("RayCluster", "srbatch")]["spec"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(head["resources"]) and rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (gpu,) = rc["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and rc["enableInTreeAutoscaling"] is True
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for name in ("srbatch-upscale", "srbatch-train"):
        spec = docs[("RayJob", name)]["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["entrypointNumCpus"] >= 1 and yaml.safe_load(spec["runtimeEnvYAML"])
        # the same cluster shape as the RayCluster (only the replica counts differ)
        a, b = copy.deepcopy(spec["rayClusterSpec"]), copy.deepcopy(rc)
        for g in (*a["workerGroupSpecs"], *b["workerGroupSpecs"]):
            for k in ("replicas", "minReplicas", "maxReplicas"):
                g.pop(k)
        assert a == b, name
    # credentials: every Ray container takes them from the Secret; no AWS key is written anywhere under infra/
    for _, d in _all_manifests():
        if d["apiVersion"] != "ray.io/v1":
            continue
        spec = d["spec"].get("rayClusterSpec", d["spec"])
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            for c in group["template"]["spec"]["containers"]:
                assert {"secretRef": {"name": "srbatch-s3"}} in c.get("envFrom", []), (d["metadata"]["name"], c["name"])
                assert not any("AWS" in e["name"] and "value" in e for e in c.get("env", []))
    text = "".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*[A-Za-z0-9/+]{8}|AKIA[0-9A-Z]{16}", text)


def test_kubernetes_objects_validate_against_the_kubernetes_schema() -> None:
    import kubernetes_validate

    seen = []
    for path, doc in _all_manifests():
        if doc["apiVersion"] == "ray.io/v1":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        seen.append(doc["kind"])
    assert sorted(seen) == ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
    cron = next(d for _, d in _all_manifests() if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    bad = copy.deepcopy(cron)
    bad["spec"]["concurrencyPolicy"] = "Forbidden"
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_cronjob_script_creates_the_template_with_the_schedule_time_as_run_id(tmp_path) -> None:
    """Run the CronJob's own shell script with a stand-in `kubectl` that records what it is given."""
    docs = {d["kind"]: d for _, d in _all_manifests() if d["kind"] in ("ConfigMap", "CronJob")}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    tpl = tmp_path / "template"
    tpl.mkdir()
    (tpl / "rayjob.yaml").write_text(docs["ConfigMap"]["data"]["rayjob.yaml"])
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(f"""#!/bin/bash
if [ "$1" = create ]; then cat > {tmp_path}/created.yaml; exit 0; fi
if [ "$1" = get ]; then case "$*" in *jobStatus*) echo SUCCEEDED ;; *) echo Complete ;; esac; exit 0; fi
exit 3
""")
    kubectl.chmod(0o755)
    out = subprocess.run(["bash", "-c", script.replace(mount, str(tpl))], capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{kubectl.parent}:/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    run_id = re.search(r"--run-id (\S+)", created["spec"]["entrypoint"]).group(1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-00Z", run_id) and created["metadata"]["name"].startswith("srbatch-")
    assert "succeeded" in out.stdout


def _entrypoints() -> list[tuple[str, str]]:
    found = []
    for path, doc in _all_manifests():
        if doc["kind"] == "RayJob":
            found.append((path.name, doc["spec"]["entrypoint"]))
        if doc["kind"] == "ConfigMap":
            t = yaml.safe_load(doc["data"]["rayjob.yaml"].replace("__NAME__", "n").replace("__RUN_ID__", "r1"))
            found.append((path.name, t["spec"]["entrypoint"]))
    launcher = (INFRA / "cluster" / "aws-gpu.yaml").read_text()
    found += [("aws-gpu.yaml", m) for m in re.findall(r"(python jobs/\S+\.py .*)", launcher)]
    readme = (INFRA / "README.md").read_text()
    found += [("infra/README.md", m.strip().rstrip("\\").strip()) for m in re.findall(r"-- (python [^\n`]+)", readme)]
    return found


def test_entrypoints_name_files_and_flags_that_exist() -> None:
    from srbatch.compare.config import build_parser as compare_parser
    from srbatch.compare.config import config_from_args as compare_cfg
    from srbatch.upscale.config import build_parser as upscale_parser
    from srbatch.upscale.config import config_from_args as upscale_cfg
    from srbatch.train.config import build_parser as train_parser
    from srbatch.train.config import train_config_from_args as train_cfg

    parsers = {"upscale.py": (upscale_parser, upscale_cfg), "train.py": (train_parser, train_cfg),
               "compare.py": (compare_parser, compare_cfg)}  # fmt: skip
    checked = []
    for where, entry in _entrypoints():
        argv = shlex.split(entry)
        assert argv[0] == "python", (where, entry)
        script = Path(argv[1].replace("/app/", f"{ROOT}/")) if argv[1].startswith("/app/") else ROOT / argv[1]
        assert script.is_file(), f"{where}: {argv[1]} does not exist"
        build, to_cfg = parsers[script.name]
        try:
            args = build(script.name).parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"{where}: the job's parser refuses {entry!r}")
        to_cfg(args)  # the configuration validates too
        checked.append(script.name)
    assert {"upscale.py", "train.py", "compare.py"} <= set(checked) and len(checked) >= 5


def test_cluster_launcher_yaml_validates_against_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    import json

    schema = json.loads(schema_path.read_text())
    cfg = yaml.safe_load((INFRA / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [n for k, n in nodes.items() if k != cfg["head_node_type"]]
    assert gpu and all(n["resources"]["GPU"] >= 1 and n["min_workers"] == 0 for n in gpu)
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.14.1" in setup and "-e ~/srbatch" in setup
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "max_worker": 3}, schema)


def test_dockerfile_installs_the_project_pinned_as_non_root() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert f"ARG TORCH_VERSION={pins['torch']}" in lines and f"ARG TORCHVISION_VERSION={pins['torchvision']}" in lines
    assert "cudnn-runtime" in text and "whl/cpu" in text  # the GPU base and the CPU variant's index
    assert any(ln.startswith("RUN pip install -c constraints.txt .") for ln in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored


@pytest.mark.slow
def test_local_scheduled_runs_are_incremental() -> None:
    """infra/local/e2e.py: its own S3 server and Ray head; three submitted runs: all, nothing new, only the added."""
    p = subprocess.run([sys.executable, str(INFRA / "local" / "e2e.py")], capture_output=True, text=True, timeout=900,
                       cwd=ROOT)  # fmt: skip
    out = p.stdout + p.stderr
    print(out[-3000:])
    assert p.returncode == 0, out[-4000:]
    rows = re.findall(r"^(\S+Z)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/(\d+)", p.stdout, re.M)
    counts = [tuple(int(x) for x in r[1:]) for r in rows]
    assert counts == [(4, 4, 4, 0, 0, 4, 0), (4, 0, 0, 0, 4, 0, 4), (6, 2, 2, 0, 4, 2, 4)]
    assert "torn down" in p.stdout
