"""`vl-export deploy kuberay`: a RayService manifest (KubeRay) whose Serve config deploys the same application as
`serve --replicas` on a Kubernetes cluster.

The image must hold vl-export with the ray extra (and the Ray version named here); the bundle is a path inside the
pods: baked into the image, or on a volume claim mounted read-only where it lives. Bundles are not downloaded.
One worker pod per engine replica: each pod offers what one replica reserves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vl_export.errors import VlExportError
from vl_export.files import write_file_atomically

from .ray_config import APP_BUILDER, APP_NAME, AppSettings

SERVE_PORT = 8000


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    image: str
    ray_version: str
    memory: str = "8Gi"  # per worker pod
    head_cpus: int = 2  # the head runs the controller and proxies, not engines
    head_memory: str = "4Gi"
    volume_claim: str | None = None  # a PersistentVolumeClaim holding the bundle


def bundle_path(uri: str) -> str:
    """The bundle's absolute path inside the pods, from a path or a file:// URI; other schemes are refused."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path or not PurePosixPath(path).is_absolute():
        raise VlExportError(f"--bundle {uri!r}: give the bundle's absolute path inside the pods (baked into the "
                            "image, or on --volume-claim); bundles are not downloaded")
    return str(PurePosixPath(path))


def serve_config(settings: AppSettings) -> dict:
    """The Serve config (ray.serve.schema.ServeDeploySchema): the app, its args, and the engine's scaling options."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": APP_BUILDER,
            "args": settings.to_args(),
            "deployments": [{"name": "Engine", **settings.scale.engine_options()},
                            {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 1000}],
        }],
    }


def rayservice_manifest(settings: AppSettings, cluster: ClusterSpec) -> dict:
    """A RayService (ray.io/v1): a head pod, a worker group of one pod per engine replica, the Serve config."""
    scale = settings.scale
    cpus = _quantity(scale.cpus_per_replica)
    worker_limits = {"cpu": cpus, "memory": cluster.memory}
    if scale.gpus_per_replica:
        worker_limits["nvidia.com/gpu"] = _quantity(scale.gpus_per_replica)
    mounts, volumes = [], []
    if cluster.volume_claim:
        mounts = [{"name": "bundle", "mountPath": str(PurePosixPath(settings.replica.bundle).parent), "readOnly": True}]
        volumes = [{"name": "bundle", "persistentVolumeClaim": {"claimName": cluster.volume_claim, "readOnly": True}}]
    autoscaling = scale.max_replicas is not None
    workers = {"groupName": "engines", "replicas": scale.replicas if not autoscaling else scale.min_replicas,
               "minReplicas": scale.min_replicas if autoscaling else scale.replicas,
               "maxReplicas": scale.max_replicas if autoscaling else scale.replicas,
               "rayStartParams": {},
               "template": {"spec": {"containers": [{
                   "name": "ray-worker", "image": cluster.image,
                   "resources": {"limits": worker_limits, "requests": worker_limits},
                   **({"volumeMounts": mounts} if mounts else {})}],
                   **({"volumes": volumes} if volumes else {})}}}
    head_limits = {"cpu": str(cluster.head_cpus), "memory": cluster.head_memory}
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # no engine replica on the head
            "template": {"spec": {"containers": [{
                "name": "ray-head", "image": cluster.image,
                "resources": {"limits": head_limits, "requests": head_limits},
                "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}]}]}}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cluster.name},
        "spec": {
            "serveConfigV2": _yaml(serve_config(settings)),
            "rayClusterConfig": {"rayVersion": cluster.ray_version, "enableInTreeAutoscaling": autoscaling,
                                 "headGroupSpec": head, "workerGroupSpecs": [workers]},
        },
    }


def write_manifest(manifest: dict, out: Path | None) -> str:
    """YAML to `out` (written whole, then moved into place) or returned for stdout."""
    text = _yaml(manifest)
    if out is not None:
        write_file_atomically(out, text.encode())
    return text


def _yaml(data: dict) -> str:
    """Block style, the Serve config as a literal block (as RayService examples write it), no anchors."""
    try:
        import yaml
    except ImportError:
        raise VlExportError("writing manifests needs PyYAML: pip install 'vl-export[ray]'") from None

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False)


def _quantity(value: float) -> str:
    """A Kubernetes quantity: '2' for 2.0, '500m' for 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"
