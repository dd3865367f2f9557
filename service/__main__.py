"""``python -m service --host H --port P``: serve the configured model (the embedded SmolLM2 by default)."""

from __future__ import annotations

import argparse
import ipaddress
import logging

import uvicorn

from faithlens.logs import configure_logging
from faithlens.settings import get_core_settings
from service.app import create_app
from service.settings import get_service_settings

log = logging.getLogger("faithlens.service")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    settings, core = get_service_settings(), get_core_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    configure_logging(core.log_level, core.log_json)
    host = args.host
    if not settings.parsed_api_keys() and not is_loopback(host):
        log.warning(
            "no FAITHLENS_API_KEYS set: refusing to bind %s, binding 127.0.0.1 instead",
            host,
            extra={"requested_host": host},
        )
        host = "127.0.0.1"
    elif not settings.parsed_api_keys():
        log.warning("no FAITHLENS_API_KEYS set: authentication is off, serving on loopback only")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
