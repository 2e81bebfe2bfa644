"""credits_context: nesting, isolation between asyncio tasks, and threads (no servers)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from credits_sdk.context import bind, credits_context, current


def test_nested_contexts_override_what_they_name() -> None:
    assert current().api_key is None and dict(current().metadata) == {}
    with credits_context(api_key="k1", department_id="d1", metadata={"trace": "t", "task": "a"}) as outer:
        with credits_context(department_id="d2", metadata={"task": "b"}) as inner:
            assert (inner.api_key, inner.department_id) == ("k1", "d2")
            assert dict(inner.metadata) == {"trace": "t", "task": "b"}
            assert inner.merged_metadata({"task": "c", "n": 1}) == {"trace": "t", "task": "c", "n": 1}
        assert current() is outer
    assert current().department_id is None and current().merged_metadata(None) is None


async def test_tasks_inherit_and_do_not_leak() -> None:
    seen: dict[str, object] = {}

    async def worker(name: str) -> None:
        with credits_context(metadata={"task": name}):
            await asyncio.sleep(0)
            seen[name] = dict(current().metadata)

    with credits_context(metadata={"trace": "T"}):
        await asyncio.gather(worker("a"), worker("b"))
        assert dict(current().metadata) == {"trace": "T"}  # the tasks' own scopes stayed theirs
        seen["thread"] = await asyncio.to_thread(lambda: dict(current().metadata))
    assert seen == {"a": {"trace": "T", "task": "a"}, "b": {"trace": "T", "task": "b"}, "thread": {"trace": "T"}}


def test_threads_need_bind() -> None:
    seen: list[str | None] = []
    lock = threading.Lock()

    def look() -> None:
        with lock:
            seen.append(current().department_id)

    with credits_context(department_id="d"):
        plain = threading.Thread(target=look)
        plain.start()
        plain.join()
        bound = bind(look)
        with ThreadPoolExecutor(4) as pool:  # one bound callable, run concurrently
            list(pool.map(lambda _: bound(), range(8)))
    assert seen[0] is None and seen[1:] == ["d"] * 8


def test_bind_runs_each_call_in_its_own_copy() -> None:
    def set_inner() -> str | None:
        from credits_sdk import context

        context._current.set(context.CreditsContext(department_id="inner"))  # no reset: only this copy sees it
        return current().department_id

    bound = bind(set_inner)
    with credits_context(department_id="outer"):
        assert bound() == "inner"
        assert current().department_id == "outer"
