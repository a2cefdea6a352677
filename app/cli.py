"""``tensortrim`` with the service's sub-commands: ``serve``, ``worker``, ``keys``, ``migrate``.

They are registered into the engine's parser (``compression.cli.EXTENSIONS``), so the
one ``tensortrim`` command does both: ``python -m app.cli serve``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import compression.cli as engine_cli


def _embedded_env(data_dir: str | None) -> None:
    if data_dir:
        os.environ["TENSORTRIM_DATA_DIR"] = str(Path(data_dir).resolve())
    os.environ.setdefault("TENSORTRIM_MODE", "embedded")
    from app.settings import get_settings

    get_settings.cache_clear()


def cmd_serve(args: argparse.Namespace) -> int:
    _embedded_env(args.data_dir)
    import uvicorn

    from app.db import make_engine
    from app.main import create_app
    from app.migrate import ensure_schema
    from app.settings import get_settings

    settings = get_settings()
    if settings.mode == "embedded":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        ensure_schema(engine, auto_upgrade=True)
        engine.dispose()
    worker = None
    if settings.mode == "embedded" and not args.no_worker:
        from worker.embedded import EmbeddedWorker

        worker = EmbeddedWorker(settings)
        worker.start()
        print(f"embedded worker running (data in {settings.data_dir})", file=sys.stderr)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A full-mode Celery worker: one job per process; the GPU is whatever CUDA_VISIBLE_DEVICES names."""
    from worker.celery_app import app

    argv = ["worker", "-Q", args.queue, "--concurrency", str(args.concurrency), "--loglevel", args.loglevel,
            "--prefetch-multiplier", "1", "-n", f"{args.queue}@%h"]
    if args.beat:
        argv.append("--beat")
    app.worker_main(argv)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.auth import create_key
    from app.db import make_engine, make_sessionmaker
    from app.models import User
    from app.settings import get_settings

    _embedded_env(args.data_dir)
    settings = get_settings()
    engine = make_engine(settings.database_url)
    email = args.user if "@" in args.user else f"{args.user}@localhost"
    with make_sessionmaker(engine)() as session:
        user = session.scalars(select(User).where(User.email == email)).one_or_none()
        if user is None:
            user = User(email=email)
            session.add(user)
            session.flush()
        _, token = create_key(session, user, secret=settings.secret_key.get_secret_value(), name=args.name,
                              scopes=args.scopes.split(","))
        session.commit()
    print(token)
    print(f"API key for {email}: shown once, store it now", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    _embedded_env(args.data_dir)
    from app.migrate import main as migrate_main

    migrate_main()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the API (embedded mode: with a worker in the same process)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="embedded mode's directory (database, broker, storage)")
    p.add_argument("--no-worker", action="store_true", help="do not start the in-process worker")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker (full mode)")
    p.add_argument("--queue", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--beat", action="store_true", help="also run the reconciler schedule (one worker only)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="create an API key and print its token once")
    k.add_argument("--user", required=True, help="user name or e-mail (created if new)")
    k.add_argument("--name", default="default", help="label for the key")
    k.add_argument("--scopes", default="read,write")
    k.add_argument("--data-dir")
    k.set_defaults(func=cmd_keys_create)

    p = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_migrate)


def main(argv: list[str] | None = None) -> int:
    if register not in engine_cli.EXTENSIONS:
        engine_cli.EXTENSIONS.append(register)
    return engine_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
