"""Run the worker service: `python -m backend.serving [--host 127.0.0.1] [--port 8600]`.

It opens the cache file (ATLAS_CACHE_DIR) and is then the only process that reads or writes it;
the app (ATLAS_WORKER_URL), `python -m backend.precompute` and notebooks (`Atlas(worker_url=)`)
are its clients. ATLAS_WORKER_TOKEN: a shared token every request but /health must carry; the
service refuses to listen on anything but localhost without one.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from backend.serving import DEFAULT_PORT


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.serving",
                                     description="The Attention Atlas worker service.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    token = os.environ.get("ATLAS_WORKER_TOKEN") or None
    if token is None and not is_loopback(args.host):
        print(f"Refusing to listen on {args.host} without a token: anyone who reaches it could "
              "use the models and the cache. Set ATLAS_WORKER_TOKEN (and give the app the same "
              "value), or listen on 127.0.0.1.", file=sys.stderr)
        return 2
    import uvicorn  # only now: refusing to start should not wait for torch to load

    from backend.errors import AtlasError
    from backend.service import AtlasService
    from backend.serving.http_api import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        service = AtlasService()
    except AtlasError as e:  # the cache file is held by another process, or damaged
        print(e, file=sys.stderr)
        return 2
    print(f"Attention Atlas worker on http://{args.host}:{args.port} "
          f"(cache {service.settings.database_path}, device {service.device})", flush=True)
    try:
        uvicorn.run(create_app(service, token), host=args.host, port=args.port,
                    log_level="warning", access_log=False)
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
