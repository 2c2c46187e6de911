"""The Kubernetes manifests (deploy/kuberay): every object schema-checked (kubernetes-validate for the core kinds,
the vendored KubeRay v1.7.0 CRD schema for the RayCluster, both strict about unknown fields), then checked against
each other and against the service: the config validates, its GPU count matches the GPU worker group, every front
door (the head and the frontdoor group) runs the server over one pool with probes on a declared port, the Service
selects exactly the front doors, the head's state is kept in the Redis the manifests run, and so on."""

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


def _one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
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
    assert kinds == ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayCluster",
                     "Service", "Service"], kinds


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
    assert checked == 7


def test_core_validation_rejects_a_misspelt_field():
    kv = _kubernetes_validate()
    svc = copy.deepcopy(_one("Service", "zimage-api"))
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


def _group(name: str):
    rc = _one("RayCluster")
    (g,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    (c,) = g["template"]["spec"]["containers"]
    return g, g["template"], c


def _frontdoors():
    """(pod template, container) of every front door: the head pod and the frontdoor worker group."""
    rc, _, head = _head()
    g, template, c = _group("frontdoor")
    return [(rc["spec"]["headGroupSpec"]["template"], head), (template, c)]


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
        gpus += g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert cfg.cluster.address == "auto" and cfg.cluster.wait_for_gpus == gpus
    assert not rc["spec"]["enableInTreeAutoscaling"]  # placement is fixed at start-up
    assert cfg.frontdoor.pool  # every front door attaches to one pool of replicas


def test_every_front_door_runs_the_server_with_the_mounted_config_and_no_gpu():
    rc = _one("RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert "COPY docker/zimage-ray-node /usr/local/bin/zimage-ray-node" in (ROOT / "Dockerfile").read_text()
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # replicas go to the GPU workers
    group, _, _ = _group("frontdoor")
    assert group["rayStartParams"]["num-gpus"] == "0" and group["replicas"] >= 2
    for template, c in _frontdoors():
        assert c["command"] == ["/usr/local/bin/zimage-ray-node"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
        (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
        assert vol["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
        assert c["args"][0] == f"{mount['mountPath']}/config.yaml"
        env = {e["name"]: e for e in c["env"]}
        assert "optional" not in env["ZIMAGE_API_KEYS"]["valueFrom"]["secretKeyRef"]  # no key, no start
        # each front door's metrics carry its pod's name (the `frontdoor` label)
        assert env["ZIMAGE_FRONTDOOR_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_probes_hit_the_service_endpoints():
    cfg = _config()
    for template, c in _frontdoors():
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == 8000
        # Prometheus scrapes the key-free metrics listener, the port the pod annotation names
        assert ports["metrics"] == cfg.server.metrics_port == int(template["metadata"]["annotations"][
            "prometheus.io/port"])
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert budget >= cfg.cluster.wait_timeout_s + cfg.deployment.start_timeout_s
        assert template["spec"]["terminationGracePeriodSeconds"] >= cfg.server.drain_timeout_s + 30


def test_workers_run_kuberays_ray_start_with_the_model_cache():
    group, template, c = _group("gpu")
    spec = template["spec"]
    assert "$KUBERAY_GEN_RAY_START_CMD" in c["args"][0] and c["command"][0] == "/bin/bash"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == "/models"  # where the image's HF_HOME / MODELSCOPE_CACHE / ZIMAGE_CACHE point
    (vol,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim", "zimage-models")["metadata"][
        "name"]
    assert "ReadWriteMany" in _one("PersistentVolumeClaim", "zimage-models")["spec"]["accessModes"]
    # replicas at the front door's CPU priority, as a local Ray and zimage-ray-node start them
    assert {e["name"]: e.get("value") for e in c["env"]}["RAY_worker_niceness"] == "0"


def test_service_selects_every_front_door_and_nothing_else():
    rc = _one("RayCluster")
    svc = _one("Service", "zimage-api")
    selector = svc["spec"]["selector"]
    assert selector["ray.io/cluster"] == rc["metadata"]["name"]
    for template, c in _frontdoors():
        assert selector.items() - {"ray.io/cluster": selector["ray.io/cluster"]}.items() <= \
            template["metadata"]["labels"].items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    gpu = _group("gpu")[1]["metadata"]["labels"]
    assert not selector.items() - {"ray.io/cluster": selector["ray.io/cluster"]}.items() <= gpu.items()


def test_the_heads_state_is_kept_in_the_redis_the_manifests_run():
    """GCS fault tolerance: the head's tables in Redis, so a restarted head finds the cluster, the pool and its
    front doors as they were (docs/kubernetes.md)."""
    ft = _one("RayCluster")["spec"]["gcsFaultToleranceOptions"]
    redis_svc = _one("Service", "zimage-redis")
    port = redis_svc["spec"]["ports"][0]["port"]
    assert ft["redisAddress"] == f"redis://{redis_svc['metadata']['name']}:{port}"
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    dep = _one("Deployment", "zimage-redis")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (env,) = [e for e in c["env"] if e["name"] == "REDIS_PASSWORD"]
    assert env["valueFrom"]["secretKeyRef"] == secret  # the same password on both sides
    assert "--requirepass" in c["args"] and "--appendonly" in c["args"]
    assert redis_svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (vol,) = dep["spec"]["template"]["spec"]["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim", "zimage-redis-data")[
        "metadata"]["name"]


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
