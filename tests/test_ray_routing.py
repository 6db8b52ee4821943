"""Scale-out without a cluster: routing keys, replica ranking, the Ray request router on fake replicas, a replica's
event stream and health, the `serve --replicas` flags, and the KubeRay manifest checked against Ray's own schema."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import yaml

from vl_export.cli import main
from vl_export.errors import InputError
from vl_export.runtime.replica import EngineReplica, EngineRequest, Failure
from vl_export.runtime.routing import AffinityLedger, rank_replicas, routing_key
from vl_export.runtime.sampling import GenerationConfig
from vl_export.runtime.serving import GenerationQueue

CAT, DOG = b"cat-png-bytes", b"dog-png-bytes"


# --- routing keys and ranking (pure) ----------------------------------------------------------------------------


def test_a_conversation_keeps_its_key_across_rounds_and_an_image_shares_it_across_questions():
    first = routing_key("<image>\nWhat is this?", [CAT], [], None)
    second = routing_key("And its colour?", [CAT], [("<image>\nWhat is this?", "A cat.")], None)
    assert first == second and first.startswith("image:")
    assert routing_key("<image>\nHow many legs?", [CAT], [], None) == first  # other question, same image
    assert routing_key("<image>\nWhat is this?", [DOG], [], None) != first
    # A text-only first turn keys by its text and the system message, also when a later turn brings an image.
    text = routing_key("Hello", [], [], None)
    assert text.startswith("text:") and routing_key("<image>\nAnd this?", [DOG], [("Hello", "Hi!")], None) == text
    assert routing_key("Hello", [], [], "Be brief.") != text


def test_ranking_is_stable_and_a_replica_that_leaves_moves_only_its_own_keys():
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [f"text:{i}" for i in range(400)]
    first = {key: rank_replicas(key, replicas)[0] for key in keys}
    assert all(rank_replicas(key, reversed(replicas))[0] == first[key] for key in keys)  # order of ids is irrelevant
    assert all(sum(owner == r for owner in first.values()) > 60 for r in replicas)  # spread, about 100 each
    after = {key: rank_replicas(key, ["r1", "r2", "r4"])[0] for key in keys}
    moved = [key for key in keys if after[key] != first[key]]
    assert moved and all(first[key] == "r3" for key in moved)
    assert all(after[key] == rank_replicas(key, replicas)[1] for key in moved)  # each to its second choice


def test_affinity_ledger_tells_hits_misses_and_forgets_the_oldest_keys():
    ledger = AffinityLedger(max_keys=2)
    assert [ledger.record("a", "r1"), ledger.record("a", "r1"), ledger.record("a", "r2")] == ["new", "hit", "miss"]
    ledger.record("b", "r1")
    ledger.record("c", "r1")  # pushes out "a"
    assert ledger.record("a", "r2") == "new" and ledger.counts == {"hit": 1, "miss": 1, "new": 4}


# --- the Ray request router on fake replicas --------------------------------------------------------------------


@pytest.fixture
def router():
    pytest.importorskip("ray.serve")
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from vl_export.runtime.ray_router import CacheAffinityRouter

    router = CacheAffinityRouter(DeploymentID(name="Engine", app_name="test"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(overloaded_at=2)
    return router


def fake_replicas(*ids):
    from ray.serve._private.common import DeploymentID, ReplicaID

    deployment = DeploymentID(name="Engine", app_name="test")
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=i, deployment_id=deployment), max_ongoing_requests=8)
            for i in ids]


def choose(router, replicas, key):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    async def run():
        request = PendingRequest(args=[SimpleNamespace(routing_key=key)] if key else [], kwargs={},
                                 metadata=RequestMetadata(request_id="r", internal_request_id="r"))
        ranks = await router.choose_replicas(replicas, request)
        assert request.routing_context.should_backoff  # all replicas full: the router waits instead of spinning
        return ranks

    ranks = asyncio.run(run())
    return [[replica.replica_id.unique_id for replica in rank] for rank in ranks]


def test_router_sends_a_key_to_its_replica_then_to_the_least_loaded_when_overloaded_or_gone(router):
    replicas = fake_replicas("a", "b", "c")
    key = "image:0123456789abcdef"
    preferred, *others = rank_replicas(key, ["a", "b", "c"])
    assert choose(router, replicas, key) == [[preferred], others]  # Ray picks the least loaded within `others`
    router.replica_queue_len_cache.update(replicas["abc".index(preferred)].replica_id, 2)  # at overloaded_at
    assert choose(router, replicas, key) == [others, [preferred]]
    alive = [r for r in replicas if r.replica_id.unique_id != preferred]
    assert choose(router, alive, key) == [[others[0]], [others[1]]]  # gone: its keys go to their next choice
    unkeyed = choose(router, replicas, None)
    assert len(unkeyed) == 1 and len(unkeyed[0]) == 2 and set(unkeyed[0]) <= {"a", "b", "c"}  # power of two choices


# --- a replica's event stream and health ------------------------------------------------------------------------


class FakeStream:
    def __init__(self, pieces, result):
        self._pieces, self.result = pieces, None
        self._final = result

    def __iter__(self):
        yield from self._pieces
        self.result = self._final


class FakePipeline:
    """Answers 'ok' in two pieces, or fails as told: 'input' (the request's fault) or 'engine' (a broken session)."""

    def __init__(self):
        self.fail = None

    def stream(self, question, images, history, generation, **options):
        if self.fail == "input":
            raise InputError("the prompt is over the model's context")
        if self.fail == "engine":
            raise RuntimeError("session lost")
        return FakeStream(["o", "k"], SimpleNamespace(text="ok", finish_reason="stop"))


def request() -> EngineRequest:
    return EngineRequest("Hi", [], [], None, GenerationConfig(max_new_tokens=4), timeout_s=10, routing_key="text:1")


def collect(replica: EngineReplica) -> list:
    async def run():
        return [event async for event in replica.generate(request())]

    return asyncio.run(run())


def test_engine_replica_streams_its_id_then_the_job_and_fails_health_after_engine_failures():
    pipe = FakePipeline()
    replica = EngineReplica(GenerationQueue([pipe], max_queue=2), "r1", unhealthy_after_failures=2)
    try:
        events = collect(replica)
        assert [e.kind for e in events] == ["replica", "started", "piece", "piece", "done"]
        assert events[0].value.replica_id == "r1" and events[0].value.stats["workers"] == 1
        assert [e.value for e in events[2:4]] == ["o", "k"] and events[4].value.text == "ok"
        pipe.fail = "input"
        assert collect(replica)[-1].value == Failure("input", "the prompt is over the model's context")
        replica.check_health()  # a user's bad request says nothing about the engine
        pipe.fail = "engine"
        assert collect(replica)[-1].value == Failure("engine", "RuntimeError: session lost")
        replica.check_health()
        collect(replica)
        with pytest.raises(RuntimeError, match="failed 2 requests in a row"):
            replica.check_health()
        pipe.fail = None
        collect(replica)  # one success and the engine counts as working again
        replica.check_health()
    finally:
        replica.close()
    with pytest.raises(RuntimeError, match="shut down"):
        replica.check_health()


def test_a_full_replica_answers_busy_and_a_request_that_leaves_cancels_its_job():
    gate = threading.Event()

    class Held(FakePipeline):
        def stream(self, *args, **kwargs):
            gate.wait(5)
            return super().stream(*args, **kwargs)

    queue = GenerationQueue([Held()], max_queue=1)
    replica = EngineReplica(queue, "r1")

    async def run():
        waiting = []
        for _ in range(2):  # one held by the worker at the gate, one in the queue
            stream = replica.generate(request())
            assert (await anext(stream)).kind == "replica"
            waiting.append(asyncio.ensure_future(anext(stream)))
            await asyncio.sleep(0.1)
        busy = [event async for event in replica.generate(request())]
        for task in waiting:
            task.cancel()  # the callers left: their jobs are cancelled
        await asyncio.sleep(0)
        return busy

    try:
        busy = asyncio.run(run())
        assert busy[-1].value.kind == "busy" and "queue limit 1" in busy[-1].value.message
        gate.set()
        for _ in range(250):  # the worker drops both at their next check
            if queue.stats()["cancelled"] == 2:
                break
            threading.Event().wait(0.02)
        assert queue.stats()["cancelled"] == 2 and queue.stats()["completed"] == 0
    finally:
        gate.set()
        replica.close()


def test_replica_failures_become_the_single_process_servers_errors():
    pytest.importorskip("ray.serve")
    from vl_export.errors import VlExportError
    from vl_export.runtime.ray_serve import _error

    assert type(_error(Failure("input", "too long"))) is VlExportError  # the server answers 400, as without Ray
    busy, broken = _error(Failure("busy", "full")), _error(Failure("engine", "RuntimeError: x"))
    assert (busy.status, busy.code) == (429, "queue_full")
    assert (broken.status, broken.type, broken.message) == (500, "server_error", "generation failed: RuntimeError: x")


# --- the commands -------------------------------------------------------------------------------------------------


def test_serve_replicas_passes_its_settings_to_ray_and_single_process_stays_the_default(monkeypatch, bundle_fp32):
    pytest.importorskip("ray.serve")
    import vl_export.runtime.ray_serve as ray_serve
    import vl_export.runtime.server as server_module

    seen = {}
    monkeypatch.setattr(ray_serve, "run_ray_server", lambda settings, address: seen.update(settings=settings, address=address))
    monkeypatch.setattr(server_module, "run_server", lambda pipelines, config: seen.update(single=config))
    assert main(["serve", "--bundle", str(bundle_fp32), "--replicas", "2", "--threads", "1", "--port", "9002",
                 "--ray-address", "ray://head:10001", "--max-ongoing-requests", "3", "--affinity-overload", "2"]) == 0
    settings = seen["settings"]
    assert seen["address"] == "ray://head:10001" and "single" not in seen
    assert (settings.replica.bundle, settings.replica.backend_options) == (str(bundle_fp32.resolve()), {"threads": 1})
    assert (settings.scale.replicas, settings.scale.cpus_per_replica, settings.scale.max_ongoing_requests,
            settings.scale.overloaded_at) == (2, 1.0, 3, 2)
    assert (settings.server.port, settings.server.model_id) == (9002, "fp32")
    assert main(["serve", "--bundle", str(bundle_fp32), "--threads", "1"]) == 0 and "single" in seen


@pytest.mark.parametrize("argv, message", [
    (["--ray-address", "auto"], "need --replicas"),
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--replicas", "2", "--max-replicas", "1", "--min-replicas", "2"], "--min-replicas <= --max-replicas"),
])
def test_serve_replicas_refuses_bad_flags_before_starting_ray(argv, message, bundle_fp32, capsys):
    assert main(["serve", "--bundle", str(bundle_fp32), *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_replicas_refuses_a_missing_bundle_before_starting_ray(tmp_path, capsys):
    pytest.importorskip("ray.serve")
    import ray

    assert main(["serve", "--bundle", str(tmp_path / "none"), "--replicas", "2"]) == 2
    assert "not found" in capsys.readouterr().err and not ray.is_initialized()


def manifest(tmp_path, *flags) -> dict:
    out = tmp_path / "rayservice.yaml"
    assert main(["deploy", "kuberay", "--bundle", "/models/1b-int8", "--image", "registry.example/vl-export:ray",
                 "--out", str(out), *flags]) == 0
    return yaml.safe_load(out.read_text())


def test_kuberay_manifest_validates_against_rays_serve_schema_and_builds_the_app(tmp_path):
    pytest.importorskip("ray.serve")
    from ray.serve.config import RequestRouterConfig
    from ray.serve.schema import ServeDeploySchema

    from vl_export.runtime.ray_serve import app_builder

    service = manifest(tmp_path, "--replicas", "3", "--cpus", "2", "--volume-claim", "models")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = config.applications[0]
    assert app.import_path == "vl_export.runtime.ray_serve:app_builder" and app.route_prefix == "/"
    engine = {d.name: d for d in app.deployments}["Engine"]
    assert engine.num_replicas == 3 and engine.ray_actor_options.num_cpus == 2
    router = RequestRouterConfig(**engine.request_router_config)
    assert router.get_request_router_class().__name__ == "CacheAffinityRouter"  # its import path resolves
    assert app.args["replica"]["bundle"] == "/models/1b-int8" and app.args["replica"]["backend_options"] == {"threads": 2}
    app_builder(app.args)  # the args are what the application builder takes
    cluster = service["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"][0]
    assert workers["replicas"] == 3 and workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"
    assert workers["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"
    assert workers["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/models"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_manifest_with_autoscaling_and_gpus(tmp_path):
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    service = manifest(tmp_path, "--replicas", "2", "--max-replicas", "6", "--gpus", "1", "--cpus", "0.5")
    app = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications[0]
    engine = {d.name: d for d in app.deployments}["Engine"]
    scaling = engine.autoscaling_config
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 6, 2)
    assert engine.ray_actor_options.num_gpus == 1 and app.args["replica"]["backend_options"]["device"] == "cuda"
    cluster = service["spec"]["rayClusterConfig"]
    limits = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] and limits == {"cpu": "500m", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == 6


def test_kuberay_refuses_a_bundle_it_would_have_to_download(tmp_path, capsys):
    out = tmp_path / "m.yaml"
    assert main(["deploy", "kuberay", "--bundle", "s3://bucket/bundle", "--image", "i", "--out", str(out)]) == 2
    assert "absolute path inside the pods" in capsys.readouterr().err and not out.exists()
