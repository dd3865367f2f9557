"""``GET /ui``: a small page to type a prompt and see the audit view. Its files are the client package's
renderer (``clients/python/faithlens_client/static``), read from disk, so the server does not import the
client; nothing comes from a CDN."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from service.errors import APIError

router = APIRouter(tags=["ui"], include_in_schema=False)
FILES = {"audit.js": "text/javascript", "audit.css": "text/css", "ui.js": "text/javascript"}


@router.get("/ui")
async def ui(request: Request) -> FileResponse:
    return FileResponse(request.app.state.ui_dir / "ui.html", media_type="text/html")


@router.get("/ui/static/{name}")
async def ui_static(name: str, request: Request) -> FileResponse:
    if name not in FILES:
        raise APIError(404, "not_found", f"no UI file {name!r}")
    return FileResponse(request.app.state.ui_dir / name, media_type=FILES[name])
