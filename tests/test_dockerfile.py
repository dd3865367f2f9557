"""The image's file set, built without Docker: the Dockerfile's COPY lines are copied from the checkout into
an empty directory, a fresh venv there runs the Dockerfile's ``pip install`` lines, and the API, the worker,
the audit view's files and the embedded model must then all be found in that venv; ``/ui`` must serve the
view and the HTML audit report must inline it, without the client package (which the image lacks).

Offline: the dependencies come from a wheelhouse made of this venv's own installed distributions (each
repacked as a wheel, or taken from pip's find-links when a wheel of the same version is there), so the
fresh venv gets exactly the versions the test suite runs on, and a missing ``COPY`` or an import of
something the image does not install fails here, not in a deployment."""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import importlib.metadata as metadata
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import REPO

WORKDIR = "/app"
# Options that name an index: the test installs offline, from its wheelhouse.
INDEX_OPTIONS = {"--extra-index-url", "--index-url", "-i", "--find-links", "-f"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for keyword, rest in steps:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
    return args


def copy_context(steps: list[tuple[str, str]], root: Path) -> list[str]:
    """Copy each ``COPY src... dest`` (relative to WORKDIR) from the checkout into ``root``; the sources."""
    copied = []
    for keyword, rest in steps:
        if keyword != "COPY":
            continue
        parts = [part for part in shlex.split(rest) if not part.startswith("--")]
        *sources, dest = parts
        dest = dest.removeprefix(WORKDIR).lstrip("/")
        into_dir = dest.endswith("/") or dest in ("", ".", "./") or len(sources) > 1
        for source in sources:
            src = REPO / source
            assert src.exists(), f"COPY {source}: not in the checkout"
            target = root / dest / src.name if into_dir else root / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(
                    src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
                )
            else:
                shutil.copy2(src, target)
            copied.append(source)
    return copied


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every ``pip install`` in RUN lines, build args expanded, index options dropped."""
    args = build_args(steps)
    installs = []
    for keyword, rest in steps:
        if keyword != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"] and words[:4] != ["python", "-m", "pip", "install"]:
                continue
            words = words[words.index("install") + 1 :]
            kept, skip = [], False
            for word in words:
                if skip:
                    skip = False
                elif word in INDEX_OPTIONS:
                    skip = True
                elif not word.startswith(tuple(f"{option}=" for option in INDEX_OPTIONS)):
                    kept.append(word)
            installs.append(kept)
    return installs


def local_requirements(project: Path) -> tuple[list[Requirement], list[Requirement]]:
    """A local project's run-time dependencies and its build requirements, from its pyproject.toml."""
    data = tomllib.loads((project / "pyproject.toml").read_text())
    run = [Requirement(r) for r in data["project"].get("dependencies", [])]
    build = [Requirement(r) for r in data.get("build-system", {}).get("requires", [])]
    return run, build


def closure(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """This venv's distributions that ``roots`` need, following each one's requirements (with extras)."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[Requirement, frozenset[str]]] = [(root, frozenset()) for root in roots]
    while todo:
        requirement, parent_extras = todo.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in parent_extras or {""}
        ):
            continue
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{requirement} is not installed here: no wheel of it to offer") from None
        assert requirement.specifier.contains(dist.version, prereleases=True), (
            str(requirement),
            dist.version,
        )
        found[name] = dist
        if (name, extras) not in seen:
            seen.add((name, extras))
            todo += [(Requirement(r), extras) for r in dist.requires or []]
    return found


def find_links() -> list[Path]:
    """pip's own find-links directories (PIP_FIND_LINKS, then pip.conf), where wheels already lie."""
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    for config in (Path("/etc/pip.conf"), Path.home() / ".config" / "pip" / "pip.conf"):
        parser = configparser.ConfigParser()
        if config.is_file():
            parser.read(config)
            values += parser.get("global", "find-links", fallback="").split()
    return [Path(value) for value in dict.fromkeys(values) if Path(value).is_dir()]


def wheel_of(dist: metadata.Distribution, wheelhouse: Path, links: list[Path]) -> None:
    """A wheel of installed ``dist`` in ``wheelhouse``: linked from ``links`` when one of the same version
    lies there, otherwise repacked from its installed files (RECORD, less scripts and bytecode)."""
    name = dist.metadata["Name"]
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{dist.version}-"
    for directory in links:
        for existing in directory.glob("*.whl"):
            if existing.name.lower().startswith(stem.lower()):
                os.symlink(existing, wheelhouse / existing.name)
                return
    site = Path(str(dist.locate_file("")))
    infos = {  # its own, not the ones vendored inside it
        path.parent.as_posix()
        for path in dist.files or []
        if path.parent.name.endswith(".dist-info") and len(path.parts) == 2
    }
    assert len(infos) == 1, f"{name}: no single .dist-info with a RECORD to repack"
    info = site / infos.pop()
    tags = [
        line.split(":", 1)[1].strip()
        for line in (info / "WHEEL").read_text().splitlines()
        if line.startswith("Tag:")
    ]
    # py2-none-any + py3-none-any -> py2.py3-none-any: the compressed tag set of the file name
    parts = [".".join(dict.fromkeys(tag.split("-")[k] for tag in tags)) for k in range(3)]
    target = wheelhouse / f"{stem}{'-'.join(parts)}.whl"
    record_name = f"{info.name}/RECORD"
    rows = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as wheel:
        for path in dist.files or []:
            relative = path.as_posix()
            if relative.startswith("..") or "__pycache__" in relative or relative == record_name:
                continue
            if relative.split("/")[-1] in (
                "INSTALLER",
                "REQUESTED",
                "direct_url.json",
            ) and relative.startswith(info.name):
                continue
            data = (site / relative).read_bytes()
            wheel.writestr(relative, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([relative, f"sha256={digest}", str(len(data))])
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows([*rows, [record_name, "", ""]])
        wheel.writestr(record_name, record.getvalue())


def test_the_image_file_set_installs_and_imports(tmp_path):
    try:
        _build_and_import(tmp_path)
    finally:  # about 1.5 GB: not left for pytest's last-three-runs tmp directories
        for bulky in ("venv", "wheels"):
            shutil.rmtree(tmp_path / bulky, ignore_errors=True)


def _build_and_import(tmp_path: Path) -> None:
    steps = instructions((REPO / "Dockerfile").read_text())
    root = tmp_path / "app"
    root.mkdir()
    copied = copy_context(steps, root)
    installs = pip_installs(steps)
    assert installs, "the Dockerfile installs nothing with pip"

    # The wheelhouse: every distribution the pip lines need (local projects' dependencies and build
    # requirements, named requirements; `--no-deps` ones alone).
    roots: list[Requirement] = []
    alone: list[Requirement] = []
    for words in installs:
        no_deps = "--no-deps" in words
        for word in words:
            if word.startswith("-"):
                continue
            if word.startswith((".", "/")):
                run, build = local_requirements(root / word)
                roots += build + ([] if no_deps else run)
            else:
                (alone if no_deps else roots).append(Requirement(word))
    needed = closure(roots)
    needed |= {canonicalize_name(r.name): metadata.distribution(r.name) for r in alone}
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    links = find_links()
    for dist in needed.values():
        wheel_of(dist, wheelhouse, links)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,  # nothing from this machine's pip configuration
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    offline = ["--no-index", "--find-links", str(wheelhouse), "--no-compile", "--quiet"]
    for words in installs:
        run = subprocess.run(
            [str(python), "-m", "pip", "install", *offline, *words],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, (
            f"pip install {' '.join(words)}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        )

    check = r"""
import asyncio, importlib, importlib.util, json, sys
from pathlib import Path
venv = Path(sys.prefix)
for name in ["faithlens", "service.app", "service.launcher", "jobs.store", "training.trainer",
             "workers", "workers.app", "workers.tasks", "workers.runner"]:
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(venv), (name, module.__file__)
# the server's pages need no client package: the image does not install it
assert importlib.util.find_spec("faithlens_client") is None
from service.app import create_app
from service.view import FILES, find_view_dir
from faithlens.model import embedded_source
ui = find_view_dir()
assert ui is not None and ui.is_relative_to(venv), ui
source = embedded_source()
assert (source.directory / source.gguf_file).is_file() and source.directory.is_relative_to(venv), source
app = create_app()
assert len(app.openapi()["paths"]) > 10


async def get(path):
    # one GET through the whole ASGI app (its guards included) from a loopback peer, without a server
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000")], "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000)}
    sent, done, asked = [], asyncio.Event(), []

    async def receive():  # the (empty) body once, then the client leaves when the answer is complete
        if not asked:
            asked.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await asyncio.wait_for(app(scope, receive, send), 60)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# /ui and its files, as the server serves them
for path, name in [("/ui", "ui.html"), *((f"/ui/static/{f}", f) for f in FILES if f != "ui.html")]:
    status, body = asyncio.run(get(path))
    assert status == 200 and body == (ui / name).read_bytes(), (path, status, body[:300])
# the HTML report, as GET /v1/audits/{id}/report?format=html renders it: the view's files inlined
from service.report_html import render_report
row = {"id": "r0", "index": 0, "text": "4", "correct": True, "error": None,
       "annotations": {"summary": {"num_anchors": 0}}}
page = render_report("aud-1", None, [row])
marker = '<script type="application/json" id="fl-assets">'
assets = json.loads(page.split(marker, 1)[1].split("</script>", 1)[0])
assert assets == {"css": (ui / "audit.css").read_text(), "js": (ui / "audit.js").read_text()}
print("ok")
"""
    elsewhere = tmp_path / "elsewhere"  # not the copied tree: imports must come from the venv
    elsewhere.mkdir()
    run = subprocess.run(
        [str(python), "-c", check],
        cwd=elsewhere,
        env={**env, "FAITHLENS_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (
        copied,
        run.stdout[-2000:],
        run.stderr[-4000:],
    )
