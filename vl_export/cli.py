"""The `vl-export` command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import InputError, VlExportError
from vl_export.calibration import DEFAULT_MAX_TILES

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str):
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


@command("export")
def _export(args: argparse.Namespace) -> int:
    from vl_export.export.bundle import export_bundle

    export_bundle(args.model, Path(args.out), precision=args.dtype, overwrite=args.overwrite)
    return 0


def _generation(args: argparse.Namespace):
    """Greedy unless a sampling flag is given, as the reference's default."""
    from vl_export.runtime import GenerationConfig

    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    options = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop or ()),
                   repetition_penalty=args.repetition_penalty)
    if not sampling:
        return GenerationConfig(**options)
    return GenerationConfig(temperature=1.0 if args.temperature is None else args.temperature,
                            top_p=1.0 if args.top_p is None else args.top_p,
                            top_k=0 if args.top_k is None else args.top_k, **options)


def _backend_options(args: argparse.Namespace) -> dict:
    """--option key=value pairs, with --threads and --device on top."""
    from vl_export.runtime.bench import parse_options

    options = parse_options(args.option)
    if args.threads is not None:
        if args.threads < 1:
            raise VlExportError(f"--threads must be at least 1, got {args.threads}")
        options["threads"] = args.threads
    if args.device:
        options["device"] = args.device
    return options


def _pipeline(args: argparse.Namespace, serving: bool = False, **options):
    from vl_export.runtime import Pipeline
    from vl_export.runtime.backends import serving_options

    backend_options = _backend_options(args)
    if serving:
        backend_options = serving_options(args.backend, backend_options)
    return Pipeline.from_bundle(args.bundle, backend=args.backend, parse_special_tokens=args.parse_special_tokens,
                                **options, **backend_options)


def _cache_budgets(args: argparse.Namespace) -> dict:
    for flag in ("kv_cache_mb", "image_cache_mb"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 0 (0 turns the cache off), got {getattr(args, flag)}")
    return {"kv_cache_mb": args.kv_cache_mb, "image_cache_mb": args.image_cache_mb}


@command("run")
def _run(args: argparse.Namespace) -> int:
    import json

    pipe = _pipeline(args)
    request = dict(images=args.image or None, video=args.video, num_frames=args.frames, max_tiles=args.max_tiles,
                   system_message=args.system, generation=_generation(args))
    if args.stream and not args.json:
        stream = pipe.stream(args.prompt, **request)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        result = stream.result
    else:
        result = pipe.chat(args.prompt, **request)
        print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else result.text)
    return 0


@command("chat")
def _chat(args: argparse.Namespace) -> int:
    from vl_export.runtime.interactive import chat_loop

    return chat_loop(_pipeline(args, **_cache_budgets(args)), _generation(args), max_tiles=args.max_tiles,
                     system_message=args.system)


def _tile_cap(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of tiles >= 1 or 'all', not {value!r}")
    return n


@command("build")
def _build(args: argparse.Namespace) -> int:
    from vl_export.export.build import BuildConfig, build_bundle

    trt = _trt_options(args)
    config = BuildConfig(precision=args.precision, backend=args.backend, calib_images=args.calib_images,
                         calib_prompts=args.calib_prompts, calib_method=args.calib_method, calib_tiles=args.calib_tiles,
                         decoder_recipe=args.decoder_recipe,
                         int4_lm_head=args.int4_lm_head, int4_block=args.int4_block,
                         ort_int8_decoder=args.ort_int8_decoder,
                         verify=not args.no_verify, trt=trt, overwrite=args.overwrite)
    build_bundle(args.model, Path(args.out), config)
    return 0


@command("engines")
def _engines(args: argparse.Namespace) -> int:
    from vl_export.export.trt_build import build_engines

    build_engines(Path(args.bundle), _trt_options(args))
    return 0


def _trt_options(args: argparse.Namespace):
    from vl_export.export.trt_profiles import BuildOptions

    return BuildOptions(max_batch=args.max_batch, max_tiles=args.max_tiles, max_context=args.max_context,
                        prefill_chunk=args.prefill_chunk, optimization_level=args.opt_level,
                        timing_cache=Path(args.timing_cache) if args.timing_cache else None)


def _trt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=1, help="TensorRT: largest batch the decoder engine takes")
    p.add_argument("--max-tiles", type=int, default=None, help="TensorRT: most tiles per vision run (default 8, the pipeline's run)")
    p.add_argument("--max-context", type=int, default=None,
                   help="TensorRT: positions per sequence, prompt + answer (default: what half the GPU's memory holds)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="TensorRT: positions per prefill run; longer prompts run in chunks (default 4096)")
    p.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file to reuse and update")


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    import json

    from vl_export.errors import VerificationFailed
    from vl_export.export.verify import table, verify_bundle
    from vl_export.runtime.bench import parse_options

    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    options = _backend_options(args)
    thresholds = {k: float(v) for k, v in parse_options(args.threshold).items()}
    report = verify_bundle(Path(args.bundle), args.model, args.image, prompts, args.new_tokens, args.backend,
                           thresholds, **options)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if not report["passed"]:
        raise VerificationFailed("the bundle does not match the reference within the thresholds (see the table)")
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    import json

    from vl_export.bench import markdown, run_bench

    report = run_bench([Path(b) for b in args.bundle], args.reference, args.tiles, args.new_tokens, args.runs,
                       args.backend or ["onnxruntime"], args.threads, args.option, args.genai)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


@command("serve")
def _serve(args: argparse.Namespace) -> int:
    from vl_export.runtime.openai_schema import Limits
    from vl_export.runtime.server import ServerConfig, run_server

    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_tiles=args.max_tiles,
                    max_tokens=args.max_tokens)
    for flag in ("max_batch", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    config = ServerConfig(model_id=args.model_name or Path(args.bundle).resolve().name, host=args.host, port=args.port,
                          allow_local_files=args.allow_local_files, max_queue=args.max_queue, timeout_s=args.timeout,
                          limits=limits, read_timeout_s=args.read_timeout, max_connections=args.max_connections,
                          docs=args.docs, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                          **_cache_budgets(args))
    if args.replicas is None:
        if args.ray_address or args.max_replicas:
            raise VlExportError("--ray-address and --max-replicas need --replicas N (serving on Ray Serve)")
        run_server([_pipeline(args, serving=True)], config)
        return 0
    _serve_on_ray(args, config)
    return 0


def _serve_on_ray(args: argparse.Namespace, config) -> None:
    from vl_export.manifest import Manifest
    from vl_export.runtime.replica import ReplicaSettings

    if args.replicas < 1 or (args.max_replicas is not None and not 1 <= args.min_replicas <= args.max_replicas):
        raise VlExportError(f"--replicas must be at least 1 and 1 <= --min-replicas <= --max-replicas, got "
                            f"{args.replicas}, {args.min_replicas}, {args.max_replicas}")
    bundle = Path(args.bundle).resolve()
    Manifest.load(bundle)  # a bad bundle is refused here, not by every replica Ray starts and restarts
    from vl_export.runtime import ray_serve
    from vl_export.runtime.ray_config import AppSettings, ScaleSettings

    replica = ReplicaSettings(str(bundle), args.backend, _backend_options(args), max_queue=args.max_queue,
                              max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, **_cache_budgets(args))
    scale = ScaleSettings(replicas=args.replicas, max_replicas=args.max_replicas, min_replicas=args.min_replicas,
                          target_ongoing_requests=args.target_ongoing_requests,
                          max_ongoing_requests=args.max_ongoing_requests,
                          cpus_per_replica=args.cpus_per_replica or float(args.threads or 1),
                          gpus_per_replica=args.gpus_per_replica, overloaded_at=args.affinity_overload)
    ray_serve.run_ray_server(AppSettings(replica, scale, config), args.ray_address)


@command("deploy")
def _deploy(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from vl_export.runtime import kuberay
    from vl_export.runtime.openai_schema import Limits
    from vl_export.runtime.ray_config import AppSettings, ScaleSettings
    from vl_export.runtime.replica import ReplicaSettings
    from vl_export.runtime.server import ServerConfig

    if args.replicas < 1 or args.cpus <= 0 or args.gpus < 0 or (
            args.max_replicas is not None and not 1 <= args.min_replicas <= args.max_replicas):
        raise VlExportError("need --replicas >= 1, --cpus > 0, --gpus >= 0 and 1 <= --min-replicas <= --max-replicas")
    ray_version = args.ray_version
    if ray_version is None:
        try:
            ray_version = version("ray")
        except PackageNotFoundError:
            raise VlExportError("Ray is not installed here: name the image's Ray version with --ray-version") from None
    bundle = kuberay.bundle_path(args.bundle)
    threads = args.threads or max(1, int(args.cpus))
    options = {"threads": threads, **({"device": "cuda"} if args.gpus else {})}
    settings = AppSettings(
        ReplicaSettings(bundle, args.backend, options, max_queue=args.max_queue),
        ScaleSettings(replicas=args.replicas, max_replicas=args.max_replicas, min_replicas=args.min_replicas,
                      target_ongoing_requests=args.target_ongoing_requests, cpus_per_replica=args.cpus,
                      gpus_per_replica=args.gpus),
        ServerConfig(model_id=args.model_name or PurePosixPath(bundle).name, max_queue=args.max_queue, limits=Limits()))
    cluster = kuberay.ClusterSpec(args.name, args.image, ray_version, memory=args.memory, volume_claim=args.volume_claim)
    text = kuberay.write_manifest(kuberay.rayservice_manifest(settings, cluster), Path(args.out) if args.out else None)
    if not args.out:
        print(text, end="")
    return 0


@command("bench-serve")
def _bench_serve(args: argparse.Namespace) -> int:
    import json

    from vl_export.runtime.bench_serve import bench_serve, table

    try:
        levels = [int(n) for n in args.concurrency.split(",")]
        width, height = (int(v) for v in args.image.lower().split("x"))
    except ValueError:
        raise InputError(f"--concurrency takes counts like 1,2,4,8 and --image a size like 448x448, got "
                         f"{args.concurrency!r} and {args.image!r}") from None
    if min(levels) < 1 or args.max_tokens < 2:
        raise InputError("--concurrency counts must be >= 1 and --max-tokens >= 2 (inter-token latency needs two)")
    report = bench_serve(Path(args.bundle), levels, args.max_tokens, (width, height), args.conversation_tiles,
                         args.max_batch, args.kv_cache_mb, args.backend, **_backend_options(args))
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--backend", default="onnxruntime",
                   help="onnxruntime (ort), openvino (ov) or tensorrt (trt); or per graph, e.g. vision=openvino,decoder=onnxruntime")
    p.add_argument("--device", default=None, help="backend device, e.g. cpu or cuda for onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    p.add_argument("--option", action="append", default=[],
                   help="backend option key=value (repeatable), e.g. precision=f32 for openvino")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-mb", type=float, default=256.0,
                   help="conversation KV cache budget: a follow-up prefills only what is new (default 256; 0 off)")
    p.add_argument("--image-cache-mb", type=float, default=64.0,
                   help="image-embedding cache budget: an image seen before skips the vision encoder (default 64; 0 off)")


def _generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--max-tiles", type=int, default=None, help="most tiles per image (default: the bundle's, 12)")
    p.add_argument("--system", default=None, help="system message (default: InternVL2.5's)")
    _prompt_arguments(p)


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="encode special-token strings in text (<|im_start|>...) as control tokens, as the reference "
                        "does; default: text stays text, so a prompt cannot forge conversation turns")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vl-export",
        description="Export InternVL2.5 to ONNX / TensorRT bundles and run them without torch.",
    )
    parser.add_argument("--version", action="version", version=f"vl-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export", help="export a checkpoint to an ONNX bundle (fp32 or fp16 graphs)")
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face repo id (from the local cache), or random:<preset>")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("build", help="export + calibrate/quantize (int8) + TensorRT engines (trt) + verify, in one step")
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face repo id (from the local cache), or random:<preset>")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp32")
    p.add_argument("--backend", choices=("ort", "onnxruntime", "trt", "tensorrt"), default="ort",
                   help="ort: ONNX graphs (plus ORT-fast INT8 variants); trt: also TensorRT engines for this GPU")
    p.add_argument("--calib-images", default=None, help="directory of calibration images (default: a built-in set)")
    p.add_argument("--calib-prompts", default=None, help="file of calibration prompts, one per line")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--calib-tiles", type=_tile_cap, default=DEFAULT_MAX_TILES, metavar="N|all",
                   help=f"calibrate the vision encoder on at most N tiles: every image's whole view first, then crops "
                        f"spread over the images (default {DEFAULT_MAX_TILES}; 'all': every tile of every image)")
    p.add_argument("--decoder-recipe", choices=("weight-only", "w8a8", "w8a8-smoothquant"), default="weight-only",
                   help="INT8 decoder: weight-only (default; activations have outliers), static W8A8, or W8A8 after SmoothQuant")
    p.add_argument("--int4-lm-head", choices=("int4", "int8"), default=None,
                   help="--precision int4, ONNX Runtime decoder: lm_head 4-bit (default, faster decode) or 8-bit (closer logits)")
    p.add_argument("--int4-block", type=int, choices=(32, 64, 128), default=None,
                   help="--precision int4: weights per 4-bit block along K (default 128, the fastest; 32 for logits "
                        "closer to fp32 at ~1.5x the decode time)")
    p.add_argument("--ort-int8-decoder", choices=("matmul-nbits", "dynamic"), default=None,
                   help="--precision int8, ONNX Runtime decoder: every weight 8-bit MatMulNBits (default: the faster "
                        "decode, logits closer to fp32), or dynamic INT8 (MatMulInteger) with an 8-bit MatMulNBits "
                        "lm_head (a prompt read ~40%% faster, decode 10-40%% slower)")
    p.add_argument("--no-verify", action="store_true", help="skip the accuracy check against PyTorch")
    _trt_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("engines", help="build TensorRT engines for an existing bundle on this GPU (no torch needed)")
    p.add_argument("--bundle", required=True)
    _trt_arguments(p)

    p = sub.add_parser("run", help="answer one prompt about images or a video")
    _runtime_arguments(p)
    p.add_argument("--image", action="append", help="image file (repeatable, in order)")
    p.add_argument("--video", default=None, help="video file (needs PyAV)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video")
    p.add_argument("--prompt", required=True)
    _generation_arguments(p)
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--json", action="store_true", help='print one line: {"text", "token_ids", "timings"}')

    p = sub.add_parser("verify", help="compare a bundle with the PyTorch reference, stage by stage (exit 1 on failure)")
    _runtime_arguments(p)
    p.add_argument("--model", required=True, help="the checkpoint the bundle was built from")
    p.add_argument("--image", action="append", help="image to check with (repeatable; default: two built-in drawings)")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (default: two built-in prompts)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared per case")
    p.add_argument("--threshold", action="append", default=[], help="override a threshold, e.g. logit_cosine=0.999")
    p.add_argument("--json", default=None, help="write every number to this JSON file")

    p = sub.add_parser("bench", help="time bundles (and PyTorch eager with --reference) on this machine, in one run")
    p.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    p.add_argument("--backend", action="append", default=None,
                   help="backend for all bundles, or one per --bundle (default onnxruntime)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, for every side")
    p.add_argument("--reference", default=None, help="checkpoint to time PyTorch eager fp32 on, in the same run")
    p.add_argument("--tiles", default="1,7,13", help="tile counts for time to first token (default 1,7,13)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode for decode speed")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--option", action="append", default=[], help="backend option key=value (repeatable)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--genai", default=None, help="an onnxruntime-genai model folder to time as a decode peer, same run "
                   "(make one with python -m vl_export.export.genai_peer build --model M --out DIR)")

    p = sub.add_parser("chat", help="interactive multi-round chat; /image PATH attaches an image")
    _runtime_arguments(p)
    _generation_arguments(p)
    _cache_arguments(p)

    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server (greedy unless the request sets "
                                     "temperature, top_p or top_k; needs the serve extra)")
    _runtime_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id clients send (default: the bundle directory's name)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoding together in one engine (continuous batching; default 8, chosen by bench-serve)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt positions a newcomer prefills per step while others decode (default 512)")
    _cache_arguments(p)
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond the running ones; more get 429")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included; then 504")
    p.add_argument("--allow-local-files", default=None, metavar="ROOT",
                   help="accept image paths and file:// URLs under this directory (nothing outside it is read)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds to receive a request's headers, and its body")
    p.add_argument("--max-connections", type=int, default=64, help="open connections at most; more get 503")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    _prompt_arguments(p)
    p.add_argument("--max-tokens", type=int, default=2048, help="most new tokens a request may ask for (and the default)")
    p.add_argument("--max-tiles", type=int, default=None, help="most tiles per image (default: the bundle's, 12)")
    p.add_argument("--max-images", type=int, default=16, help="most images per request, all turns together")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--max-image-pixels", type=int, default=64_000_000)
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)

    g = p.add_argument_group("Ray Serve (the ray extra): replicas on this machine or a cluster")
    g.add_argument("--replicas", type=int, default=None,
                   help="serve from N engine replicas on Ray Serve (each one engine of --threads threads); "
                        "absent: one process")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale between --min-replicas and this")
    g.add_argument("--min-replicas", type=int, default=1)
    g.add_argument("--target-ongoing-requests", type=float, default=2.0, help="per replica, for the autoscaler")
    g.add_argument("--max-ongoing-requests", type=int, default=8, help="per replica; more wait at the ingress")
    g.add_argument("--cpus-per-replica", type=float, default=None, help="CPUs Ray reserves per replica (default --threads)")
    g.add_argument("--gpus-per-replica", type=float, default=0.0)
    g.add_argument("--affinity-overload", type=int, default=4,
                   help="ongoing requests at which a conversation's replica is passed over for the least-loaded one")

    p = sub.add_parser("bench-serve", help="concurrent streaming clients against the serving engine, over loopback")
    _runtime_arguments(p)
    p.add_argument("--concurrency", default="1,2,4,8", help="streams per level (default 1,2,4,8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument("--image", default="448x448", help="each client's image size (default 448x448: one tile)")
    p.add_argument("--conversation-tiles", type=int, default=7, help="tiles of the conversation's image (default 7)")
    p.add_argument("--max-batch", type=int, default=None, help="engine slots (default: the highest concurrency)")
    p.add_argument("--kv-cache-mb", type=float, default=256.0, help="conversation KV cache budget (default 256)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")

    p = sub.add_parser("deploy", help="write a deployment for a cluster: `deploy kuberay` writes a RayService manifest")
    p.add_argument("target", choices=("kuberay",))
    p.add_argument("--bundle", required=True, help="the bundle's absolute path inside the pods (image or --volume-claim)")
    p.add_argument("--image", required=True, help="container image with vl-export[ray] installed")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas, one worker pod each")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (and per worker pod)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica; set: the replicas run ONNX Runtime on CUDA")
    p.add_argument("--memory", default="8Gi", help="memory per worker pod (a Kubernetes quantity)")
    p.add_argument("--threads", type=int, default=None, help="backend threads per replica (default: --cpus)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting in each replica beyond the running ones")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale between --min-replicas and this")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--target-ongoing-requests", type=float, default=2.0)
    p.add_argument("--volume-claim", default=None, help="PersistentVolumeClaim holding the bundle, mounted read-only")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the bundle directory's name)")
    p.add_argument("--name", default="vl-export", help="the RayService's name")
    p.add_argument("--ray-version", default=None, help="Ray version in the image (default: the one installed here)")
    p.add_argument("--out", default=None, help="write the manifest here (default: stdout)")
    return parser




def one_line(message: str) -> str:
    """Control characters escaped: a message quoting a bundle's text stays one line and sends no terminal escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VlExportError as exc:
        print(f"vl-export: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vl-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
