"""A dependency handed to a route when the route is built, and filled in when the lifespan has made it.

Routes are built with the app, before its lifespan runs; the services they need (pools, the upstream client, the
encoder) are made by the lifespan, inside the event loop. Each route gets a `Provided` at construction — passed
in, never looked up — and calls it per request.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Provided(Generic[T]):
    __slots__ = ("_name", "_value")

    def __init__(self, name: str) -> None:
        self._name = name
        self._value: T | None = None

    def set(self, value: T) -> None:
        self._value = value

    def __call__(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self._name} is used before the lifespan made it")
        return self._value
