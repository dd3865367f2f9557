"""Cooperative time slices for long computations that share the model with a decode loop.

An analysis (a scoring pass, exact AtMan, an ``atman_rl`` mask fit) can take a minute; decode steps take
milliseconds. Rewriting every analysis as a resumable state machine would duplicate the math, so the
analysis runs unchanged on its own thread, and the two threads hand control to each other: the analysis
runs only while the engine thread waits for it, and it gives control back at its next *checkpoint* once
its time budget is spent. Checkpoints sit between units of work: before every decoder layer's attention
and MLP (:func:`install_checkpoints`, so every forward pass of every method is cut alike), between the
probe's row chunks and the LM head's chunks. Exactly one of the two threads runs at any time, so the
model is never used concurrently, and the analysis computes exactly what it computes unsliced: same ops,
same shapes, same order.

Stopping (client gone, deadline passed) raises :class:`SliceStop` at the next checkpoint, which unwinds
the analysis and frees its tensors at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
_current = threading.local()


class SliceStop(BaseException):
    """Raised at a checkpoint to unwind a stopped computation; ``reason`` is what the caller reports.
    A BaseException, so that ``except Exception`` inside the analysis cannot swallow it."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


def checkpoint() -> None:
    """A unit of work ended: hand control back if the slice is used up. A no-op outside a sliced run."""
    run: SlicedRun | None = getattr(_current, "run", None)
    if run is not None:
        run._checkpoint()


def _hook(module: torch.nn.Module, args: object) -> None:
    if not torch.compiler.is_compiling():  # a compiled decode step is never sliced; keep it traceable
        checkpoint()


def install_checkpoints(model: torch.nn.Module) -> int:
    """Put a checkpoint before every decoder layer's attention and MLP. Idempotent; returns how many
    modules carry one. The hooks stay when peft wraps or unwraps the model (it keeps these modules)."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("DecoderLayer"):
            targets = [module, getattr(module, "self_attn", None), getattr(module, "mlp", None)]
            for target in filter(None, targets):
                if not getattr(target, "_faithlens_checkpoint", False):
                    target.register_forward_pre_hook(_hook)
                    target._faithlens_checkpoint = True
                count += 1
    return count


class SlicedRun(Generic[T]):
    """``fn`` run in slices on its own thread. Not thread-safe: one owner calls :meth:`run_slice` and
    :meth:`stop`; ``fn`` runs only inside those calls."""

    def __init__(self, fn: Callable[[], T], name: str = "faithlens-slice") -> None:
        self._fn = fn
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._budget_end = 0.0
        self._stop: SliceStop | None = None
        self.started = False
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None
        self.slices = 0

    def run_slice(self, budget_s: float) -> bool:
        """Let ``fn`` run until its first checkpoint after ``budget_s`` seconds; True once it has ended."""
        if self.done:
            return True
        started = time.perf_counter()
        self._budget_end = started + budget_s
        self._resume()
        self.slices += 1
        return self.done

    def stop(self, reason: BaseException) -> None:
        """Unwind ``fn`` at its next checkpoint with ``reason`` as its error; returns once it has ended."""
        if self.done:
            return
        self._stop = SliceStop(reason)
        if not self.started:
            self.done, self.error = True, reason
            return
        self._resume()

    def _resume(self) -> None:
        if self.started:
            self._go.release()
        else:
            self.started = True
            self._thread.start()
        self._back.acquire()

    def _main(self) -> None:
        _current.run = self
        try:
            self.result = self._fn()
        except SliceStop as stop:
            self.error = stop.reason
        except BaseException as exc:  # handed to the owner, who decides how to report it
            self.error = exc
        finally:
            _current.run = None
            self.done = True
            self._back.release()

    def _checkpoint(self) -> None:
        if self._stop is None and time.perf_counter() < self._budget_end:
            return
        if self._stop is None:
            self._back.release()
            self._go.acquire()
        if self._stop is not None:
            raise self._stop
