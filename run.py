"""Switchboard's entry point: `python run.py [serve]` starts the server; other subcommands manage models."""

import warnings

# eventlet warns on import that it is in bugfix-only mode; it is the product's chosen server mode.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402  isort:skip

eventlet.monkey_patch()  # before any other import, so sockets and threads in every library are green

from core.concurrency import configure_library_threads  # noqa: E402

configure_library_threads()  # before transformers or tqdm load (core/concurrency.py says why)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Switchboard: one chat page for local, Ollama and OpenAI-compatible models."
    )
    parser.add_argument("--data-dir", help="data directory (default ./data, env SWITCHBOARD_DATA_DIR)")
    parser.add_argument("--model-dir", help="model cache (default <data-dir>/models, env MODEL_DIR)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the web server (the default)")
    for target in (parser, serve):
        target.add_argument("--host", help="address to bind (default 127.0.0.1)")
        target.add_argument("--port", type=int, help="port (default 5000)")
        target.add_argument(
            "--api-token",
            help="require this access token from every API and Socket.IO "
            "client (env SWITCHBOARD_API_TOKEN, which keeps it out of the process list)",
        )
    try:
        from core.models import cli as models_cli
    except ImportError:  # the model manager CLI is optional at this stage
        models_cli = None
    if models_cli is not None:
        models_cli.add_commands(sub)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    from core.concurrency import use_real_locks_for_logging

    use_real_locks_for_logging()
    for noisy in ("werkzeug", "engineio.server", "socketio.server", "httpx", "httpx2", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(settings) -> int:
    import eventlet_server
    from core.errors import SwitchboardError
    from web_ui import create_app
    from web_ui.extensions import socketio

    try:
        app = create_app(settings, async_mode="eventlet")
    except SwitchboardError as exc:  # Redis or PostgreSQL named in the settings cannot be reached
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    eventlet_server.harden(socketio)
    log = logging.getLogger("switchboard")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
        log.warning(
            "event=insecure_bind host=%s message=binding a non-loopback address without "
            "--api-token lets anyone on the network use your models",
            settings.host,
        )
    log.info(
        "event=server_start url=http://%s:%d data_dir=%s model_dir=%s",
        settings.host,
        settings.port,
        settings.data_path,
        settings.model_path,
    )
    eventlet_server.serve(app, settings.host, settings.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.config import load_settings
    from core.errors import SwitchboardError

    overrides = {
        "data_dir": args.data_dir,
        "model_dir": args.model_dir,
        "log_level": args.log_level,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "api_token": getattr(args, "api_token", None),
    }
    try:
        settings = load_settings(overrides)
    except SwitchboardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command in (None, "serve"):
        return serve(settings)
    from core.models import cli as models_cli

    return models_cli.run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
