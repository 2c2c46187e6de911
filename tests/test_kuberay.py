"""The Kubernetes manifests (deploy/kuberay): every object schema-checked (kubernetes-validate for the core kinds,
the vendored KubeRay v1.7.0 CRD schema for the RayCluster, both strict about unknown fields), then checked against
each other and against the service: the config validates, its GPU count matches the worker group, probes hit the
right endpoints on a declared port, the Service selects the head pod, and so on."""

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
CRD_SCHEMA = ROOT / "tests" / "schemas" / "kuberay-v1.7.0-raycluster-v1.json"
K8S_VERSIONS = ("1.30", "1.37")  # the oldest and newest Kubernetes this is checked for


def _kubernetes_validate():
    try:
        import kubernetes_validate.utils as kv
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed; it comes with `pip install -e .[test]`")
        pytest.skip("kubernetes-validate is not installed (pip install -e .[test])")
    return kv


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind]
    return doc


def _strict(schema):
    """Close every object schema that lists its properties (what the API server's strict field validation does)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _raycluster_errors(doc: dict) -> list[str]:
    schema = _strict(json.loads(CRD_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc.get("metadata", {}).get("name", "")):
        errors.append("metadata.name is not a DNS-1123 label")
    for g in doc.get("spec", {}).get("workerGroupSpecs", []):
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31):
            errors.append(f"worker group {g.get('groupName')}: minReplicas <= replicas <= maxReplicas does not hold")
    return errors


# ---- schema validation ------------------------------------------------------------------------------------------
def test_every_manifest_is_a_known_kind():
    kinds = sorted(d["kind"] for _, d in _docs())
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim", "RayCluster", "Service"], kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_strictly(version):
    kv = _kubernetes_validate()
    checked = 0
    for name, doc in _docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {'.'.join(map(str, e.path))}: {e.message}")
        checked += 1
    assert checked == 4


def test_core_validation_rejects_a_misspelt_field():
    kv = _kubernetes_validate()
    svc = copy.deepcopy(_one("Service"))
    svc["spec"]["ports"][0]["targetPorts"] = svc["spec"]["ports"][0].pop("targetPort")
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, K8S_VERSIONS[-1], strict=True)


def test_raycluster_validates_against_the_kuberay_crd():
    errors = _raycluster_errors(_one("RayCluster"))
    assert not errors, errors


@pytest.mark.parametrize("mutate,fragment", [
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replica=2), "'replica' was unexpected"),
    (lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
     .update(path=5), "is not of type 'string'"),
    (lambda rc: rc["spec"]["authOptions"].update(mode="password"), "is not one of"),
    (lambda rc: rc["spec"]["headGroupSpec"].pop("template"), "'template' is a required property"),
    (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(minReplicas=3), "minReplicas <= replicas"),
])
def test_raycluster_validation_rejects_mistakes(mutate, fragment):
    rc = copy.deepcopy(_one("RayCluster"))
    mutate(rc)
    errors = _raycluster_errors(rc)
    assert any(fragment in e for e in errors), errors


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == files


# ---- the manifests against each other and the service -----------------------------------------------------------
def _head():
    rc = _one("RayCluster")
    (c,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return rc, rc["spec"]["headGroupSpec"]["template"]["spec"], c


def _config():
    from zimage_common.config import config_from_dict

    data = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])
    return config_from_dict(data, "deploy/kuberay/configmap.yaml")


def test_config_validates_and_waits_for_the_worker_gpus():
    cfg = _config()
    rc = _one("RayCluster")
    gpus = 0
    for g in rc["spec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        gpus += g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.cluster.address == "auto" and cfg.cluster.wait_for_gpus == gpus
    assert not rc["spec"]["enableInTreeAutoscaling"]  # placement is fixed at start-up


def test_head_runs_the_server_with_the_mounted_config():
    rc, spec, c = _head()
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert c["command"] == ["/usr/local/bin/zimage-ray-head"]
    assert "COPY docker/zimage-ray-head /usr/local/bin/zimage-ray-head" in (ROOT / "Dockerfile").read_text()
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert c["args"][0] == f"{mount['mountPath']}/config.yaml"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # replicas go to the GPU workers
    keys = [e for e in c["env"] if e["name"] == "ZIMAGE_API_KEYS"]
    assert keys and "optional" not in keys[0]["valueFrom"]["secretKeyRef"]  # no key, no start


def test_probes_hit_the_service_endpoints():
    _, spec, c = _head()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000
    cfg = _config()  # Prometheus scrapes the key-free metrics listener, the port the pod annotation names
    annotations = _head()[0]["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert ports["metrics"] == cfg.server.metrics_port == int(annotations["prometheus.io/port"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    cfg = _config()
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget >= cfg.cluster.wait_timeout_s + cfg.deployment.start_timeout_s
    assert spec["terminationGracePeriodSeconds"] >= cfg.server.drain_timeout_s + 30


def test_workers_run_kuberays_ray_start_with_the_model_cache():
    rc = _one("RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (c,) = spec["containers"]
    assert "$KUBERAY_GEN_RAY_START_CMD" in c["args"][0] and c["command"][0] == "/bin/bash"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == "/models"  # where the image's HF_HOME / MODELSCOPE_CACHE / ZIMAGE_CACHE point
    (vol,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    assert "ReadWriteMany" in _one("PersistentVolumeClaim")["spec"]["accessModes"]


def test_service_selects_the_head_pod_port():
    rc, _, c = _head()
    svc = _one("Service")
    assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}


def test_one_image_non_root_everywhere():
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    rc = _one("RayCluster")
    job = _one("Job")
    specs = [rc["spec"]["headGroupSpec"]["template"]["spec"], job["spec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    images = {c["image"] for s in specs for c in s["containers"]}
    assert len(images) == 1, images  # the same Ray and Python on every node
    for s in specs:
        sc = s["securityContext"]
        assert sc["runAsNonRoot"] and (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user.groups()


def test_download_job_fetches_the_configured_model():
    cfg = _config()
    job = _one("Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert f"snapshot_download('{cfg.model.model_id}')" in " ".join(c["args"])
    assert cfg.model.source == "modelscope" and cfg.model.offline and cfg.model.cache_dir is None
