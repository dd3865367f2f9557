"""The SDK's shape, checked without a server: the sync and async clients (and each of their resources) offer
the same public calls with the same parameters, every public method says what it returns, and the package
never imports the server's code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import faithlens_client
import pytest
from faithlens_client import AsyncFaithlens, Faithlens, _client

MODULES = [
    importlib.import_module(f"faithlens_client.{info.name}")
    for info in pkgutil.iter_modules(faithlens_client.__path__)
]


def public_methods(cls: type) -> dict[str, types.FunctionType]:
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def resources(client: object) -> dict[str, object]:
    """The client's sub-resources (``models``, ``adapters``, ``jobs``, ``audits``): its attributes whose class is
    one of the SDK's."""
    return {
        name: value
        for name, value in vars(client).items()
        if not name.startswith("_") and type(value).__module__ == _client.__name__
    }


def assert_twins(sync_cls: type, async_cls: type) -> None:
    sync, asynchronous = public_methods(sync_cls), public_methods(async_cls)
    assert sorted(sync) == sorted(asynchronous), f"{sync_cls.__name__} vs {async_cls.__name__}"
    for name, fn in sync.items():
        twin = asynchronous[name]
        where = f"{sync_cls.__name__}.{name} vs {async_cls.__name__}.{name}"
        assert list(inspect.signature(fn).parameters.values()) == list(
            inspect.signature(twin).parameters.values()
        ), where
        returns = inspect.signature(fn).return_annotation
        assert returns is not inspect.Signature.empty, where
        # the async twin returns the same thing awaited, or an async iterator where the sync one iterates
        assert inspect.signature(twin).return_annotation == returns.replace("Iterator", "AsyncIterator"), (
            where
        )
        assert not inspect.iscoroutinefunction(fn), where
        assert inspect.iscoroutinefunction(twin) or returns.startswith("Iterator"), where


def test_sync_and_async_clients_have_the_same_calls():
    assert_twins(Faithlens, AsyncFaithlens)
    assert {"audit", "follow_job", "capabilities", "chat", "chat_stream", "wait"} <= set(
        public_methods(AsyncFaithlens)
    )
    sync, asynchronous = Faithlens("http://127.0.0.1:9"), AsyncFaithlens("http://127.0.0.1:9")
    try:
        assert (
            sorted(resources(sync))
            == sorted(resources(asynchronous))
            == ["adapters", "audits", "jobs", "models"]
        )
        for name, resource in resources(sync).items():
            twin = resources(asynchronous)[name]
            assert type(twin).__name__ == f"Async{type(resource).__name__}"
            assert public_methods(type(resource)), name
            assert_twins(type(resource), type(twin))
    finally:
        sync.close()


@pytest.mark.parametrize(
    ("method", "builder"),
    [("generate", _client.generate_call), ("analyze", _client.analyze_call), ("audit", _client.audit_call)],
)
def test_client_calls_take_what_their_request_builders_take(method, builder):
    params = list(inspect.signature(getattr(Faithlens, method)).parameters.values())
    assert params[0].name == "self"
    assert params[1:] == list(inspect.signature(builder).parameters.values())


def test_every_public_method_has_a_return_type():
    missing = []
    for module in MODULES:
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                functions = {name: obj}
            elif inspect.isclass(obj):
                functions = {
                    f"{name}.{attr}": (value.fget if isinstance(value, property) else value)
                    for attr, value in vars(obj).items()
                    if not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
                }
            else:
                continue
            missing += [
                f"{module.__name__}.{qual}"
                for qual, fn in functions.items()
                if inspect.signature(fn).return_annotation is inspect.Signature.empty
            ]
    assert not missing


def test_the_sdk_never_imports_the_server():
    code = (
        "import sys, faithlens_client, faithlens_client.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'faithlens', 'service', 'training', 'workers', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
