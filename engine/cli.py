"""The ``tta-engine`` command line: export, generate, chat, embed, models, verify, pack, install-artifact,
demo, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import TTAEngineError


def _configs(args):
    from .config import load_model_configs

    return load_model_configs(args.config)


def _cfg(args, name: str):
    from .config import get_config

    return get_config(_configs(args), name)


def cmd_export(args) -> int:
    from .export.pipeline import ExportOptions, export_models

    cfg = _cfg(args, args.name)
    precisions = list(dict.fromkeys(args.precision or [cfg.precision]))
    options = ExportOptions(out_root=args.out, graph=args.graph, block_size=args.block_size, cache_dir=args.cache_dir,
                            prefill_precision=args.prefill_precision, allow_low_fidelity=args.allow_low_fidelity,
                            activations=args.activations)
    for art in export_models(cfg, precisions, options):
        precision = art.precision
        val = art.manifest["validation"][precision]
        print(f"exported {cfg.name} ({precision}, {art.manifest['graph']} graph) -> {art.path}  "
              f"[{art.size_bytes / 1e6:.1f} MB]")
        print("  validation: " + ", ".join(f"{k}={v}" for k, v in val.items()))
        low = art.manifest["validation"].get("low_fidelity")
        if low:
            from .export.gate import describe

            print(f"  LOW FIDELITY (published with --allow-low-fidelity): {describe(low['failed'])}")
    return 0


def _sampling_kwargs(args) -> dict:
    kw = {}
    for key in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        val = getattr(args, key, None)
        if val is not None:
            kw[key] = val
    if getattr(args, "stop", None):
        kw["stop"] = args.stop
    return kw


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cfg_of_kind(args, name: str, kind: str):
    from .errors import ModelTypeError

    cfg = _cfg(args, name)
    if cfg.model_type != kind:
        raise ModelTypeError(cfg.name, cfg.model_type, kind)
    if getattr(args, "export", False) and (args.backend or cfg.backend) != "torch":
        from .manager import export_missing

        export_missing(cfg, args.artifacts, announce=_say)
    return cfg


def _open_lm(args, name: str):
    from .runtime import open_language_model

    return open_language_model(_cfg_of_kind(args, name, "causal_lm"), artifacts_root=args.artifacts,
                               backend=args.backend, threads=args.threads, device=args.device)


def _stream_reply(lm, messages, kwargs) -> str:
    from .generator import GenerationState

    state = GenerationState(0)
    parts = []
    for delta in lm.events(messages, state=state, **kwargs):
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    c = state.completion()
    print(f"\n[{c['usage']['completion_tokens']} tokens, first token {c['timings']['time_to_first_token_s'] * 1000:.0f} ms, "
          f"{c['timings']['decode_tokens_per_s']:.1f} tok/s, {lm.kind}, finish: {c['finish_reason']}]",
          file=sys.stderr)
    return "".join(parts)


def cmd_generate(args) -> int:
    from .inputs import check_prompt

    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": check_prompt(args.prompt)})
    lm = _open_lm(args, args.name)
    print(f"[{args.name}: {lm.kind} on {lm.device}]", file=sys.stderr)
    try:
        _stream_reply(lm, messages, _sampling_kwargs(args))
    finally:
        lm.close()
    return 0


def cmd_chat(args) -> int:
    lm = _open_lm(args, args.name)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {args.name} ({lm.kind} on {lm.device}); empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = _stream_reply(lm, messages, _sampling_kwargs(args))
        messages.append({"role": "assistant", "content": reply})
    lm.close()
    return 0


def cmd_embed(args) -> int:
    from .embeddings import open_encoder
    from .inputs import check_texts

    texts = check_texts(args.texts)
    enc = open_encoder(_cfg_of_kind(args, args.name, "embedding"), artifacts_root=args.artifacts,
                       backend=args.backend, device=args.device)
    kind = "onnx" if type(enc).__name__ == "OrtEncoder" else "torch"
    print(f"[{args.name}: {kind} on {enc.device}]", file=sys.stderr)
    vecs = enc.encode(texts)
    for text, vec in zip(texts, vecs, strict=True):
        print(f"{text[:40]!r}: dim {len(vec)} [{', '.join(f'{x:.4f}' for x in vec[:6])}, ...]")
    if len(texts) > 1:
        sims = vecs @ vecs.T
        print("cosine similarity:")
        for i, t in enumerate(texts):
            print(f"  {t[:30]!r:34}" + " ".join(f"{sims[i, j]:6.3f}" for j in range(len(texts))))
    return 0


def cmd_models(args) -> int:
    """Artifact status of each configured model, decided by the type of error loading it raises:
    sizes are always checked; hashes only with --verify (else the status says "not verified")."""
    from .artifact import artifact_dir, load_artifact
    from .errors import ArtifactCorruptedError, ArtifactError, ArtifactMissingError

    configs = _configs(args)
    print(f"{'model':24} {'type':10} {'precision':9} {'artifact':36} {'size':>9}  source")
    for cfg in configs.values():
        path = artifact_dir(args.artifacts, cfg.name, cfg.precision)
        size = ""
        try:
            art = load_artifact(path, verify=False, rehash=args.verify)  # --verify: hash now
            status = f"{'verified' if args.verify else 'not verified'} ({art.manifest['graph']})"
            if art.manifest.get("validation", {}).get("low_fidelity"):
                status += " LOW FIDELITY"
            size = f"{art.size_bytes / 1e6:.1f} MB"
        except ArtifactMissingError:
            status = "missing"
        except ArtifactCorruptedError:
            status = "corrupted (re-export)"
        except ArtifactError:
            status = "unusable (re-export)"
        print(f"{cfg.name:24} {cfg.model_type:10} {cfg.precision:9} {status:36} {size:>9}  {cfg.source.describe()}")
    return 0


def cmd_verify(args) -> int:
    from .artifact import artifact_dir, load_artifact

    cfg = _cfg(args, args.name)
    art = load_artifact(artifact_dir(args.artifacts, cfg.name, args.precision or cfg.precision), rehash=True)
    print(f"{art.path}: {len(art.manifest['files'])} files match their sha256")
    return 0


def cmd_pack(args) -> int:
    from .pack import pack_artifacts

    out = pack_artifacts(args.artifacts, args.name, args.precision, args.output)
    print(f"packed {args.name} -> {out} [{out.stat().st_size / 1e6:.1f} MB]")
    return 0


def cmd_install_artifact(args) -> int:
    from .pack import install_artifacts

    for art in install_artifacts(args.file, args.artifacts):
        print(f"installed {art.name} ({art.precision}) -> {art.path} [{art.size_bytes / 1e6:.1f} MB, hashes verified]")
    return 0


def cmd_demo(args) -> int:
    """The README's main job: export both packaged defaults, stream a narrative reply, compare embeddings."""
    from .embeddings import open_encoder
    from .runtime import open_language_model

    configs = _configs(args)
    lm_cfg, emb_cfg = configs[args.lm], configs[args.embedder]
    from .manager import export_missing

    for cfg in (lm_cfg, emb_cfg):
        export_missing(cfg, args.artifacts, announce=_say)
    lm = open_language_model(lm_cfg, artifacts_root=args.artifacts, backend="onnx")
    messages = [
        {"role": "system", "content": "You are the gentle narrator of a calming text adventure."},
        {"role": "user", "content": "I step into a quiet forest at dusk. Describe what I notice."},
    ]
    print(f"--- {lm_cfg.name} ({lm_cfg.precision}, streaming) ---")
    _stream_reply(lm, messages, {"max_new_tokens": 96, "temperature": 0.0})
    lm.close()
    enc = open_encoder(emb_cfg, artifacts_root=args.artifacts, backend="onnx")
    texts = ["I feel anxious about tomorrow.", "I'm worried about what happens next.", "The dragon guards a golden hoard."]
    t0 = time.perf_counter()
    v = enc.encode(texts)
    ms = (time.perf_counter() - t0) * 1000
    print(f"--- {emb_cfg.name} ({emb_cfg.precision}) embeddings, {len(texts)} texts in {ms:.1f} ms ---")
    print(f"  sim({texts[0]!r}, {texts[1]!r}) = {float(v[0] @ v[1]):.3f}")
    print(f"  sim({texts[0]!r}, {texts[2]!r}) = {float(v[0] @ v[2]):.3f}")
    return 0


def _serve_ray(args, api_key) -> int:
    from .artifact import default_artifacts_dir
    from .server.hosts import default_allowed_hosts
    from .server.ray_app import RaySettings, require_ray, start

    require_ray()  # the install hint before anything else
    from .manager import TransformersModelManager

    configs = _configs(args)
    names = TransformersModelManager(configs)  # loads nothing: resolves the names before Ray starts
    preload = tuple(names.resolve_name(name) for name in args.models)
    app_kwargs = dict(api_key=api_key, max_body_bytes=args.max_body_bytes, shutdown_grace_s=args.shutdown_grace,
                      allowed_hosts=tuple(args.allowed_hosts or ()) or default_allowed_hosts(args.host),
                      allowed_origins=tuple(args.allowed_origins or ()), docs=args.docs,
                      max_embedding_requests=args.max_embedding_requests)
    # replicas run in Ray's worker directories: a relative (or the default ./artifacts) root is this one's
    root = str((args.artifacts or default_artifacts_dir()).resolve())
    settings = RaySettings(configs=configs, artifacts_root=root, replicas=args.replicas or 2,
                           threads=args.threads, backend=args.backend, device=args.device, max_batch=args.max_batch,
                           max_queue=args.max_queue, max_loaded_models=args.max_loaded_models,
                           preload=preload, autoscaling=args.autoscale, app_kwargs=app_kwargs)
    threads = settings.replica_threads()  # a bad --threads fails here
    print(f"serving {settings.replicas} Ray Serve replica(s) on http://{args.host}:{args.port} "
          f"({threads} thread(s) each); Ctrl-C or SIGTERM drains and stops", file=sys.stderr)
    start(settings, args.host, args.port, address=args.address, blocking=True)
    return 0


def cmd_serve(args) -> int:
    import os

    from .manager import TransformersModelManager
    from .server import serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise TTAEngineError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty; "
                                 "export the key in it (or drop the option to serve without a key)")
    if args.ray:
        return _serve_ray(args, api_key)
    if args.replicas is not None or args.address is not None or args.autoscale:
        raise TTAEngineError("--replicas, --address and --autoscale belong to a Ray deployment: add --ray")
    manager = TransformersModelManager(_configs(args), artifacts_root=args.artifacts, backend=args.backend,
                                       threads=args.threads, max_batch=args.max_batch, max_queue=args.max_queue,
                                       max_loaded_models=args.max_loaded_models, device=args.device)
    for name in args.models:
        manager.resolve_name(name)  # an unknown name fails here, before the port is bound
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key (--api-key-env)", file=sys.stderr)
    import signal

    # uvicorn drains on SIGTERM, then re-raises it under the handler found at start: exit 0 after the drain
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(manager, args.host, args.port, api_key=api_key, preload=tuple(args.models),
          max_body_bytes=args.max_body_bytes, shutdown_grace_s=args.shutdown_grace,
          allowed_hosts=tuple(args.allowed_hosts or ()), allowed_origins=tuple(args.allowed_origins or ()),
          docs=args.docs, max_embedding_requests=args.max_embedding_requests)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="model config TOML (default: packaged configs/models.toml)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifacts root (default: ./artifacts or $TTA_ENGINE_ARTIFACTS)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, type=_device_arg,
                   help="auto (GPU when the backend can use it), cpu, cuda or cuda:N (default: the config's)")


def _device_arg(value: str) -> str:
    from .device import parse_device
    from .errors import ConfigError

    try:
        parse_device(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default=None)
    add_device_option(p)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_export_flag(p)


def _add_export_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", action="store_true",
                   help="export the model's artifact first when none is published (progress on stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="compile a configured model into a validated ONNX artifact")
    _add_common(p)
    p.add_argument("name")
    p.add_argument("--precision", action="append", choices=["fp32", "fp16", "int8", "int4"],
                   help="repeatable; default: the config's precision")
    p.add_argument("--out", type=Path, default=None, help="artifacts root to write into")
    p.add_argument("--graph", choices=["auto", "fused", "optimum"], default="auto")
    p.add_argument("--block-size", dest="block_size", type=int, default=32, help="int4 block size")
    p.add_argument("--prefill-precision", dest="prefill_precision", choices=["int8", "none"], default=None,
                   help="extra graph that int4 artifacts use for prompts (int8 prefills faster on VNNI/AMX CPUs, "
                        "at some fidelity); default: the model config's prefill_graph")
    p.add_argument("--activations", choices=["auto", "int8", "int16"], default="auto",
                   help="int4: how 8-bit matrices quantize their inputs: int8 (fastest), int16 (two int8 digits: "
                        "closer, ~12%% slower decode on Gemma 3) or auto (int16 only when int8 misses the targets)")
    p.add_argument("--cache-dir", dest="cache_dir", default=None, help="Hugging Face cache dir for hub sources")
    p.add_argument("--allow-low-fidelity", dest="allow_low_fidelity", action="store_true",
                   help="publish even when the validation figures fail the thresholds (marked in the manifest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="stream a reply to one prompt")
    _add_common(p)
    _add_runtime(p)
    p.add_argument("name")
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_common(p)
    _add_runtime(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embed texts and print their cosine similarities")
    _add_common(p)
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default=None)
    _add_export_flag(p)
    add_device_option(p)
    p.add_argument("name")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("models", help="configured models, artifact status and sizes")
    _add_common(p)
    p.add_argument("--verify", action="store_true", help="hash every artifact file (else sizes only)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("verify", help="check an artifact's files against its manifest hashes")
    _add_common(p)
    p.add_argument("name")
    p.add_argument("--precision", default=None)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("pack", help="archive exported artifacts (hashes verified) for another machine")
    _add_common(p)
    p.add_argument("name")
    p.add_argument("--precision", action="append", default=None, help="repeatable; default: every exported one")
    p.add_argument("-o", "--output", type=Path, required=True, help="FILE.tar.gz or FILE.tar.zst")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("install-artifact", help="verify and install an archive made by `pack` (atomic)")
    _add_common(p)
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_install_artifact)

    p = sub.add_parser("demo", help="export the packaged defaults, stream a reply, compare embeddings")
    _add_common(p)
    p.add_argument("--lm", default="smollm2-135m-instruct")
    p.add_argument("--embedder", default="all-minilm-l6-v2")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn) over the model manager")
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", nargs="*", default=[], metavar="NAME", help="models to load at startup")
    p.add_argument("--api-key-env", dest="api_key_env", default=None, metavar="VAR",
                   help="environment variable holding the API key; every route but /health then needs "
                        "'Authorization: Bearer <key>'")
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default=None)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    add_device_option(p)
    p.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="batch rows per model")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64,
                   help="waiting requests per model before 429")
    p.add_argument("--max-loaded-models", dest="max_loaded_models", type=int, default=4)
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=4 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--shutdown-grace", dest="shutdown_grace", type=float, default=30.0,
                   help="seconds running requests may finish after SIGTERM before they are stopped")
    p.add_argument("--allowed-hosts", dest="allowed_hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header names answered ('*': any); default: loopback names for a loopback bind, "
                        "the bound address plus loopback for an address, any for 0.0.0.0 (DNS rebinding guard)")
    p.add_argument("--allowed-origins", dest="allowed_origins", nargs="+", default=None, metavar="ORIGIN",
                   help="browser origins answered, with CORS (e.g. http://localhost:3000; '*': any); default: "
                        "same-origin and pages on allowed hosts only")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--max-embedding-requests", dest="max_embedding_requests", type=int, default=64,
                   help="/v1/embeddings requests running or waiting before 429")
    p.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve with session affinity "
                   "(extra 'ray'; docs/ray.md)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas (default 2); --threads "
                   "is per replica (default: physical cores // replicas)")
    p.add_argument("--address", default=None, help="with --ray: the Ray cluster ('auto', 'ray://HOST:10001'); "
                   "default: start one on this machine")
    p.add_argument("--autoscale", action="store_true",
                   help="with --ray: autoscale between 1 and --replicas on the ongoing requests")
    p.set_defaults(func=cmd_serve)

    _add_bench(sub)
    return parser


def _checkout_benchmarks() -> Path | None:
    """``benchmarks/`` of the source checkout this package runs from (editable install), if any."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return here if (here / "bench" / "__init__.py").is_file() else None


def _add_bench(sub) -> None:
    """``tta-engine bench``: the harness lives in the checkout's benchmarks/bench, not in the wheel."""
    benchmarks = _checkout_benchmarks()
    if benchmarks is not None:
        if str(benchmarks) not in sys.path:
            sys.path.insert(0, str(benchmarks))
        from bench import add_bench_parser  # stdlib-only at import time

        add_bench_parser(sub)
        return

    def unavailable(args) -> int:
        raise TTAEngineError("`tta-engine bench` runs from a source checkout (the benchmark harness is not "
                             "part of the installed package): clone the repository, `make setup`, then "
                             "`.venv/bin/tta-engine bench` or `make bench`")

    # prefix_chars without "-": every bench option lands in ``rest`` and gets the message below
    p = sub.add_parser("bench", help="benchmarks (from a source checkout only)", prefix_chars="+", add_help=False)
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=unavailable)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TTAEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, like other CLI tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
