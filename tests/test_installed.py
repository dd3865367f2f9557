"""The server and the worker installed the way the README also allows: ``pip install -e .`` alone (no client
package), then ``python -m service`` and ``python -m workers``, without ``FAITHLENS_DATA_DIR`` pointing at
the data (issue 23).

The install is real: a fresh venv whose only view of this venv is its site-packages directory as a path
entry (so its dependencies import, but none of its ``.pth`` files run: neither this checkout's editable
install nor the client package's), into which ``pip install --no-deps --no-build-isolation -e <repo>``
installs the project as a user would. pip leaves this venv's own installation alone (it is outside the
new environment). A finder in the new venv refuses ``faithlens_client``, however it is installed here.
The server and the worker run with that interpreter from a directory outside the checkout, so every import
goes through the editable install, against a private redis-server, on the tiny model. No mocks."""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from faithlens.tiny import save_tiny
from tests.servers import REPO, Server, start_server
from tests.test_job_store import private_redis

HIDE_CLIENT = '''"""``faithlens_client`` is not installed here, whatever the venv this one borrows from holds: every
finder answers for it as a finder answers for a package that is not there (None)."""
import sys


class HideClient:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == "faithlens_client" or name.startswith("faithlens_client."):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [HideClient(finder) for finder in sys.meta_path]
'''

PIP_OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
ROWS = [
    {"id": "a", "prompt": "Q: 2+2?", "completion": " 2+2=4. #### 4", "reference": "#### 4"},
    {"id": "b", "messages": [{"role": "user", "content": "3+4?"}], "completion": " 7", "reference": 8},
]


def installed_venv(root: Path) -> Path:
    """A venv holding this project as ``pip install -e .`` installs it, without the client package; its
    python."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    site_dir = Path(purelib)
    # this venv's packages as plain path entries: importable, but their .pth files (editable installs) never run
    (site_dir / "borrowed.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    (site_dir / "hide_faithlens_client.py").write_text(HIDE_CLIENT)
    # named to run after the other .pth files, so that it wraps every finder they install
    (site_dir / "zz_hide_faithlens_client.pth").write_text("import hide_faithlens_client\n")
    env = {**_clean_env(), "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run(
        [str(python), "-m", "pip", "install", *PIP_OFFLINE, "-e", str(REPO)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return python


def _clean_env() -> dict[str, str]:
    """This process' environment less what would bypass the install: PYTHONPATH, the UI and data dirs."""
    drop = {"PYTHONPATH", "FAITHLENS_UI_DIR", "FAITHLENS_DATA_DIR", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop}


class InstalledWorker:
    """``python -m workers`` with the installed interpreter, from outside the checkout."""

    def __init__(self, python: Path, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [str(python), "-m", "workers", "--hostname", f"w{uuid.uuid4().hex[:6]}@%h"],
            cwd=cwd,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Stack:
    python: Path
    server: Server
    worker: InstalledWorker
    work: Path
    settings: dict[str, str]

    @property
    def data(self) -> Path:
        return Path(self.settings["FAITHLENS_DATA_DIR"])

    @property
    def model(self) -> Path:
        return Path(self.server.env["FAITHLENS_MODEL"])

    def start_server(self, name: str, **env: str) -> Server:
        """Another server of the same install, model, Redis and queues."""
        return start_server(
            self.work / name, self.model, python=self.python, cwd=self.outside, **{**self.settings, **env}
        )

    @property
    def outside(self) -> Path:
        return self.work / "elsewhere"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    # start_server passes this process' environment on; nothing in it may bypass the install
    assert "FAITHLENS_UI_DIR" not in os.environ, "unset FAITHLENS_UI_DIR to run these tests"
    work = tmp_path_factory.mktemp("installed")
    python = installed_venv(work)
    (work / "elsewhere").mkdir()  # not the checkout: imports come from the editable install
    data = work / "no-data"  # FAITHLENS_DATA_DIR as a fresh install has it: nothing there
    data.mkdir()
    tiny = save_tiny(work / "tiny-llama")
    suffix = uuid.uuid4().hex[:8]
    with private_redis(work / "redis") as url:
        settings = {
            "PYTHONPATH": "",
            "REDIS_URL": url,
            "FAITHLENS_DATA_DIR": str(data),
            "FAITHLENS_JOB_QUEUE": f"faithlens-jobs-installed-{suffix}",
            "FAITHLENS_AUDIT_QUEUE": f"faithlens-audits-installed-{suffix}",
            "FAITHLENS_TORCH_THREADS": "1",
            "FAITHLENS_API_KEYS": "",
        }
        server = start_server(work, tiny, python=python, cwd=work / "elsewhere", **settings)
        worker = InstalledWorker(python, server.env, work / "elsewhere", work / "worker.log")
        try:
            yield Stack(python, server, worker, work, settings)
        finally:
            worker.stop()
            server.stop()


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


def _wait_completed(c: httpx.Client, audit_id: str, worker: InstalledWorker, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        audit = c.get(f"/v1/audits/{audit_id}").json()
        if audit["status"] in {"completed", "failed", "cancelled"}:
            return audit
        assert worker.proc.poll() is None, worker.log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, (audit, worker.log.read_text(errors="replace")[-3000:])
        time.sleep(0.3)


@pytest.mark.parametrize("client_on_path", [False, True])
def test_the_install_is_the_editable_one_without_the_client(stack, client_on_path):
    """The precondition of every test here: the project imports from the checkout through the editable
    install, and the client package does not import at all, even with its folder on the path."""
    check = (
        "import importlib, importlib.util, service, workers, faithlens\n"
        "print(service.__file__, workers.__file__, faithlens.__file__)\n"
        "assert importlib.util.find_spec('faithlens_client') is None\n"
        "try:\n    importlib.import_module('faithlens_client')\n    print('client importable')\n"
        "except ModuleNotFoundError:\n    print('no client')\n"
    )
    env = _clean_env()
    if client_on_path:
        env["PYTHONPATH"] = str(REPO / "clients" / "python")
    run = subprocess.run(
        [str(stack.python), "-c", check],
        cwd=stack.outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    paths, client = run.stdout.splitlines()
    for path in paths.split():
        assert Path(path).is_relative_to(REPO), path
    assert client == "no client"


def test_ui_is_served_without_the_client_package(stack):
    with stack.server.client() as c:
        page = c.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], page.text[:500]
        for name in ("audit.js", "audit.css", "ui.js"):
            r = c.get(f"/ui/static/{name}")
            assert r.status_code == 200 and r.text.strip(), (name, r.status_code, r.text[:300])


def test_html_report_renders_without_the_client_package(stack):
    css = (REPO / "clients" / "python" / "faithlens_client" / "static" / "audit.css").read_text()
    with stack.server.client() as c:
        r = c.post("/v1/audits", json={"input": ROWS, "analysis": {"metrics": ["fai", "waad", "flags"]}})
        assert r.status_code == 200, r.text
        audit = _wait_completed(c, r.json()["id"], stack.worker)
        assert audit["status"] == "completed", audit
        page = c.get(f"/v1/audits/{audit['id']}/report", params={"format": "html"})
        assert page.status_code == 200, page.text[:1000]
        assert "text/html" in page.headers["content-type"]
        # the audit view's own stylesheet is inlined (as JSON) for each row's "open audit" page
        first_rule = next(line for line in css.splitlines() if "{" in line).split("{")[0].strip()
        assert first_rule and first_rule.replace("/", "\\/") in page.text, first_rule
    log = stack.server.log_text()
    assert "Traceback" not in log and "internal_error" not in log, log[-3000:]


def test_a_gsm8k_job_is_refused_up_front_when_the_data_is_missing(stack):
    body = {
        "method": {"type": "grpo", "max_steps": 1},
        "training_data": "gsm8k-train",
        "adapter_name": "installed",
    }
    with stack.server.client() as c:
        before = c.get("/v1/jobs").json()["data"]
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 400, r.text
        error = _error(r)
        assert error["code"] == "dataset_unavailable" and error["param"] == "training_data", error
        assert str(stack.data / "gsm8k" / "train.jsonl") in error["message"], error
        assert "FAITHLENS_DATA_DIR" in error["message"], error
        assert c.get("/v1/jobs").json()["data"] == before  # nothing stored, nothing queued


@pytest.mark.parametrize(("dataset", "split"), [("gsm8k-dev", "dev"), ("gsm8k-train", "train")])
def test_a_gsm8k_audit_is_refused_up_front_when_the_data_is_missing(stack, dataset, split):
    with stack.server.client() as c:
        before = c.get("/v1/audits").json()["data"]
        r = c.post("/v1/audits", json={"input": dataset, "limit": 2})
        assert r.status_code == 400, r.text
        error = _error(r)
        assert error["code"] == "dataset_unavailable" and error["param"] == "input", error
        assert str(stack.data / "gsm8k" / f"{split}.jsonl") in error["message"], error
        assert "FAITHLENS_DATA_DIR" in error["message"], error
        assert c.get("/v1/audits").json()["data"] == before


def test_readyz_reports_the_datasets_without_failing_readiness(stack):
    with stack.server.client() as c:
        r = c.get("/readyz")
    assert r.status_code == 200, r.text
    ready = r.json()
    assert ready["status"] == "ready" and ready["checks"] == {"model": True, "engine": True}, ready
    assert ready["datasets"] == {"gsm8k-dev": False, "gsm8k-train": False}, ready


def test_readyz_sees_the_datasets_once_they_are_there(stack):
    """The probe looks at the files each time: the data arriving later is reported without a restart."""
    folder = stack.data / "gsm8k"
    folder.mkdir()
    try:
        (folder / "dev.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
        with stack.server.client() as c:
            assert c.get("/readyz").json()["datasets"] == {"gsm8k-dev": True, "gsm8k-train": False}
            body = {"input": "gsm8k-dev", "limit": 1, "sampling": {"max_new_tokens": 4}}
            r = c.post("/v1/audits", json=body)
            assert r.status_code == 200, r.text
            assert _wait_completed(c, r.json()["id"], stack.worker)["status"] == "completed"
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_without_the_view_files_pages_answer_501_never_500(stack):
    """A server whose view files cannot be found (here FAITHLENS_UI_DIR names an empty directory) says so
    with a stable code; the JSON report and everything else go on."""
    empty = stack.work / "no-view"
    empty.mkdir(exist_ok=True)
    with stack.server.client() as c:
        r = c.post("/v1/audits", json={"input": ROWS[:1]})
        assert r.status_code == 200, r.text
        audit_id = _wait_completed(c, r.json()["id"], stack.worker)["id"]
    server = stack.start_server("second", FAITHLENS_UI_DIR=str(empty))
    try:
        with server.client() as c:
            for path, params in [
                ("/ui", None),
                ("/ui/static/audit.js", None),
                ("/ui/static/audit.css", None),
                (f"/v1/audits/{audit_id}/report", {"format": "html"}),
            ]:
                r = c.get(path, params=params)
                assert r.status_code == 501, (path, r.status_code, r.text[:500])
                error = _error(r)
                assert error["code"] == "ui_unavailable", (path, error)
                assert str(empty) in error["message"] and "FAITHLENS_UI_DIR" in error["message"], error
            assert c.get(f"/v1/audits/{audit_id}/report").status_code == 200
        # the SDK (from this venv, where it is installed) raises it typed and at once: 501 is not retried
        from faithlens_client import Faithlens
        from faithlens_client.errors import InternalServerError

        started = time.monotonic()
        with pytest.raises(InternalServerError) as exc:
            Faithlens(base_url=server.url, api_key="").audits.report_html(audit_id)
        assert exc.value.status == 501 and exc.value.code == "ui_unavailable", exc.value
        assert time.monotonic() - started < 5
        log = server.log_text()
        assert "Traceback" not in log and "internal_error" not in log, log[-3000:]
    finally:
        server.stop()


def test_the_view_mapping_in_pyproject_is_the_one_the_server_reads():
    """The server's wheel ships the client's static files as ``service/static`` (one copy, in the client
    package); ``service.view`` reads them there, or in place in a checkout. Both name the same folder."""
    from service import view

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"][view.PACKAGE] == view.SOURCE.as_posix()
    assert view.PACKAGE in setuptools["packages"]
    assert sorted(setuptools["package-data"][view.PACKAGE]) == sorted(view.FILES)
    assert all((REPO / view.SOURCE / name).is_file() for name in view.FILES)
    assert view.find_view_dir() == (REPO / view.SOURCE).resolve()


def test_without_any_view_folder_the_report_and_ui_raise_501(tmp_path, monkeypatch):
    """An install where neither the wheel's ``service/static`` nor a checkout's folder exists: the one
    function both pages use raises the 501, naming both places."""
    from service import view
    from service.errors import APIError
    from service.report_html import render_report

    monkeypatch.setattr(view, "_HERE", tmp_path / "site-packages" / "service")
    assert view.find_view_dir() is None
    for call in (lambda: view.view_file(None, "ui.html"), lambda: render_report("a1", None, [])):
        with pytest.raises(APIError) as exc:
            call()
        assert (exc.value.status, exc.value.code) == (501, "ui_unavailable")
        for place in view.candidates():
            assert str(place) in exc.value.message, exc.value.message
