"""Where the server finds the audit view's files (``audit.js``, ``audit.css``, ``ui.html``, ``ui.js``), which
``/ui`` serves and the HTML audit report inlines.

There is one copy of them: the client package's renderer, ``clients/python/faithlens_client/static``. The
server does not import or depend on the client package; it ships those files itself. pyproject.toml maps a
data-only package, ``service.static``, onto that folder (setuptools ``package-dir`` + ``package-data``), so
a wheel of the server (``pip install .``, the Docker image) holds them as ``service/static/``, and an
editable install (``pip install -e .``) or a plain checkout reads them in place, beside ``service/``.

The other ways were worse: declaring ``faithlens-client`` a dependency needs a direct reference, which
must be an absolute ``file://`` URL (no relative path works from a fresh clone, and a published wheel
would carry this machine's path); moving the files into the server and having the client's build reach
out of its own project for them breaks ``pip install ./clients/python`` from an sdist or a copy of that
folder alone, and the client must install on its own (no torch). Copying them would make two views.

``FAITHLENS_UI_DIR`` overrides the folder. When the files cannot be found, ``/ui`` and
``/v1/audits/{id}/report?format=html`` answer 501 ``ui_unavailable`` naming where they were looked for,
never 500; everything else is unaffected."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from service.errors import APIError

PACKAGE = "service.static"  # the package pyproject.toml maps onto SOURCE
SOURCE = PurePosixPath("clients/python/faithlens_client/static")  # relative to the checkout's root
FILES = ("audit.css", "audit.js", "ui.html", "ui.js")
_HERE = Path(__file__).resolve().parent


def candidates() -> list[Path]:
    """Where the files may be: the installed wheel's ``service/static``, then the checkout's folder."""
    return [_HERE / "static", _HERE.parent / SOURCE]


def find_view_dir() -> Path | None:
    """The first candidate folder that holds every file of the view; None when none does."""
    for folder in candidates():
        if all((folder / name).is_file() for name in FILES):
            return folder
    return None


def view_file(ui_dir: Path | None, name: str) -> Path:
    """The view's file ``name`` in ``ui_dir`` (None: the folder :func:`find_view_dir` finds); 501
    ``ui_unavailable`` when it is not there."""
    folder = ui_dir if ui_dir is not None else find_view_dir()
    if folder is not None and (folder / name).is_file():
        return folder / name
    if ui_dir is not None:
        where = f"no {name} in FAITHLENS_UI_DIR ({ui_dir})"
    else:
        where = "its files are in none of " + ", ".join(str(c) for c in candidates())
    raise APIError(
        501,
        "ui_unavailable",
        f"this server cannot show the audit view: {where}. Install faithlens with its files (pip install . "
        f"or -e . from a checkout), or set FAITHLENS_UI_DIR to a folder holding {', '.join(FILES)}",
    )


def read_asset(ui_dir: Path | None, name: str) -> str:
    return view_file(ui_dir, name).read_text(encoding="utf-8")
