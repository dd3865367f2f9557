"""``python -m service --host H --port P``: serve the configured model (the embedded SmolLM2 by default)."""

from __future__ import annotations

import argparse

import uvicorn

from faithlens.logs import configure_logging
from faithlens.settings import get_core_settings
from service.app import bind_host, create_app
from service.settings import get_service_settings


def main(argv: list[str] | None = None) -> None:
    settings, core = get_service_settings(), get_core_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    configure_logging(core.log_level, core.log_json)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=bind_host(args.host, settings),
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
