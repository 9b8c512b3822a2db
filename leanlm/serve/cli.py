"""`leanlm serve [MODEL]`: the OpenAI-compatible server. The web stack is imported only when
the command runs, so `leanlm --help` stays fast."""
from __future__ import annotations

import os
import sys
import time


def register(sub, add_model_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description="Serve a model over an OpenAI-compatible API. Binds 127.0.0.1 unless "
                                   "--host says otherwise.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="HF checkpoint dir, .gguf file or alias (same as --model)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LEANLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LEANLM_API_KEY); "
                        "/health and /metrics stay open")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: MODEL as given, or the embedded alias)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 8 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import signal
    import threading

    import uvicorn

    from leanlm.cli import resolve_model_arg
    from leanlm.config import EngineConfig
    from leanlm.engine.async_engine import AsyncLLM
    from leanlm.engine.engine import LLMEngine
    from leanlm.models.embedded import EMBEDDED_ALIAS
    from leanlm.serve.app import DEFAULT_MAX_BODY_BYTES, build_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    model = resolve_model_arg(args)
    t0 = time.perf_counter()
    llm = AsyncLLM(LLMEngine(EngineConfig(
        model=model, dtype=args.dtype, device=args.device, seed=args.seed, compile=args.compile,
        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, quant=args.quant, spec=args.spec)), start=False)
    name = args.served_model_name or model or EMBEDDED_ALIAS
    print(f"[leanlm] loaded {llm.model_path} in {time.perf_counter() - t0:.1f}s; serving it as "
          f"{name!r} on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""),
          file=sys.stderr)
    app = build_app(llm, name, api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))

    def serve_http() -> None:
        try:
            server.run()  # in a non-main thread uvicorn leaves signals to us
        except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
            pass
        finally:  # the web server is gone (stopped, or failed to bind): stop the engine
            llm.shutdown(wait=False)

    def stop(signum, frame) -> None:
        server.should_exit = True
        llm.shutdown(wait=False)

    web = threading.Thread(target=serve_http, name="leanlm-http", daemon=True)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # The engine steps on this thread, the one that loaded the model (see AsyncLLM's docstring).
        llm.run_engine_loop(on_ready=web.start)
    finally:
        server.should_exit = True
        web.join(15)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        print(f"leanlm: error: the server could not start on {args.host}:{args.port} (see above)",
              file=sys.stderr)
        return 1
    return 0
