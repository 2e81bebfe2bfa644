"""Who is charging, for which department, and why: carried by a context variable.

    with credits_context(department_id=research, metadata={"trace_id": trace}):
        await client.consume("web_search")          # charged to research, with trace_id

Everything charged inside picks the context up: the clients' methods, ``@metered``
functions, ``MeteredAgent`` helpers and bulk jobs. Nested contexts override what they
name and keep the rest (metadata is merged key by key, the inner value wins); an
explicit argument to a call wins over the context.

Propagation follows ``contextvars``: an asyncio task starts with a copy of its
creator's context, and ``asyncio.to_thread`` copies it too. A plain ``threading.Thread``
or ``ThreadPoolExecutor.submit`` does not: wrap the callable with ``bind`` (which copies
the caller's context at bind time and runs each call in its own copy of it).
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from credits_sdk.models import Metadata, MetadataValue

P = ParamSpec("P")
R = TypeVar("R")

_EMPTY: Mapping[str, MetadataValue] = types.MappingProxyType({})


@dataclass(frozen=True)
class CreditsContext:
    """The ambient values of one scope. ``client`` is a ``CreditsClient`` or an
    ``AsyncCreditsClient`` that ``@metered`` functions use when given none."""

    api_key: str | None = None
    department_id: str | None = None
    metadata: Mapping[str, MetadataValue] = field(default_factory=lambda: _EMPTY)
    client: Any = None

    def merged_metadata(self, explicit: Mapping[str, MetadataValue] | None) -> Metadata | None:
        """The context's metadata with ``explicit`` on top; None when both are empty."""
        if not self.metadata and not explicit:
            return None
        return {**self.metadata, **(explicit or {})}


_ROOT = CreditsContext()  # frozen: safe to share as the default
_current: contextvars.ContextVar[CreditsContext] = contextvars.ContextVar("credits_sdk_context", default=_ROOT)


def current() -> CreditsContext:
    """The context in force here (an empty one outside every ``credits_context``)."""
    return _current.get()


@contextmanager
def credits_context(
    *,
    api_key: str | None = None,
    department_id: str | None = None,
    metadata: Mapping[str, MetadataValue] | None = None,
    client: Any = None,
) -> Iterator[CreditsContext]:
    """Enter a scope whose charges use these values; what is not named is inherited."""
    parent = _current.get()
    scope = CreditsContext(
        api_key=api_key if api_key is not None else parent.api_key,
        department_id=department_id if department_id is not None else parent.department_id,
        metadata=types.MappingProxyType({**parent.metadata, **(metadata or {})}),
        client=client if client is not None else parent.client,
    )
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the caller's context, for threads that would not inherit it.

    Each call runs in a fresh copy of the captured context, so one bound callable may
    run in several threads at once.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return run
