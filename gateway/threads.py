"""Blocking work (database, Redis) off the event loop, in a small pool of our own threads.

A leaner hop than asgiref's ``sync_to_async``, which measured as a visible share of a
request. Each pool thread keeps its own database connection (CONN_MAX_AGE), and every
function run here starts with ``close_old_connections()`` where it uses the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-io")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(POOL, fn, *args)
