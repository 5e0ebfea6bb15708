"""Per-request state shared by the drafters, with one set of misuse errors.

Both drafters keep state per active request; keeping the bookkeeping here means the engine sees
the same ``ValueError`` messages whichever drafter it drives.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

S = TypeVar("S")


class ActiveRequests(Generic[S]):
    """A map from request id to state that refuses double starts and unknown ids."""

    def __init__(self) -> None:
        self._states: dict[Hashable, S] = {}

    def add(self, req_id: Hashable, state: S) -> None:
        if req_id in self._states:
            raise ValueError(f"Request '{req_id}' is already active")
        self._states[req_id] = state

    def get(self, req_id: Hashable) -> S:
        try:
            return self._states[req_id]
        except KeyError:
            raise ValueError(f"Request '{req_id}' is not active") from None

    def pop(self, req_id: Hashable) -> S:
        state = self.get(req_id)
        del self._states[req_id]
        return state

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._states

    def __len__(self) -> int:
        return len(self._states)
