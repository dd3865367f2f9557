"""Tokenisation off the engine thread: a small pool of threads, each with its own tokenizer copy.

A 1 MB prompt takes a while to tokenise; on the engine thread it stalls every stream. transformers' fast
tokenizers are not safe to share across threads that set truncation or padding, so every pool thread
deep-copies the tokenizer once and uses only its own copy.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, tokenizer: Any, threads: int = 2) -> None:
        self._template = tokenizer
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faithlens-tokenizer")

    def _own(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._template)
        return tokenizer

    async def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(tokenizer)`` on a pool thread, with that thread's own tokenizer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._own()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
