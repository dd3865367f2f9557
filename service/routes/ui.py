"""``GET /ui``: a small page to type a prompt and see the audit view. Its files are the client package's
renderer (``clients/python/faithlens_client/static``), which the server ships and reads from disk
(service/view.py), so it neither imports nor needs the client package; nothing comes from a CDN. Without
them, 501 ``ui_unavailable``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from service.errors import APIError
from service.view import view_file

router = APIRouter(tags=["ui"], include_in_schema=False)
FILES = {"audit.js": "text/javascript", "audit.css": "text/css", "ui.js": "text/javascript"}


@router.get("/ui")
async def ui(request: Request) -> FileResponse:
    return FileResponse(view_file(request.app.state.ui_dir, "ui.html"), media_type="text/html")


@router.get("/ui/static/{name}")
async def ui_static(name: str, request: Request) -> FileResponse:
    if name not in FILES:
        raise APIError(404, "not_found", f"no UI file {name!r}")
    return FileResponse(view_file(request.app.state.ui_dir, name), media_type=FILES[name])
