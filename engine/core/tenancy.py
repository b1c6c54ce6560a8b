"""Workspaces: the tenant that each API call acts for.

Every sandbox, volume, secret, deployment and task belongs to one workspace.
A gRPC call over TCP acts for the workspace of its bearer token, and one over
the daemon's unix socket, which only root can open, for the workspace of its
token if it sends one and for DEFAULT_WORKSPACE otherwise. The HTTP adapter
always requires a token. Objects of other workspaces are reported as not
found, so that a caller cannot even learn that an id exists.

The workspace of the running call is a context variable: the servers set it
around each call, and the Engine reads it. Embedded use never sets it, so it
acts for DEFAULT_WORKSPACE.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator

from engine.errors import InvalidArgument, PermissionDenied

DEFAULT_WORKSPACE = "default"
WORKSPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

_current: contextvars.ContextVar[str] = contextvars.ContextVar(
    "engine_workspace", default=DEFAULT_WORKSPACE
)
# Whether the call comes from the host's root without a token, who may name
# any workspace in requests that have a workspace field.
_local_admin: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "engine_local_admin", default=True
)


def check_workspace(name: str) -> str:
    """Return ``name`` if it is a valid workspace name, else raise InvalidArgument."""
    if not isinstance(name, str) or not WORKSPACE_PATTERN.match(name):
        raise InvalidArgument(
            f"invalid workspace {name!r}: use 1 to 63 lowercase letters, digits,"
            " '.', '_' or '-', starting with a letter or digit"
        )
    return name


def current_workspace() -> str:
    """Return the workspace that the running call acts for."""
    return _current.get()


def enter_workspace(workspace: str, *, local_admin: bool = False) -> None:
    """Make ``workspace`` current for the rest of the running task.

    asyncio gives each task a copy of its creator's context, and gRPC runs
    each call in a task of its own, so the setting ends with the call.
    """
    _current.set(check_workspace(workspace))
    _local_admin.set(local_admin)


def is_local_admin() -> bool:
    """Return whether the running call is the host's root without a token."""
    return _local_admin.get()


def requested_workspace(requested: str) -> str:
    """Return the workspace a request names, or the current one if it names none.

    Raises PermissionDenied when a caller with a token names another
    workspace than its token's.
    """
    current = _current.get()
    if not requested or requested == current:
        return current
    check_workspace(requested)
    if _local_admin.get():
        return requested
    raise PermissionDenied(
        f"the token acts for workspace {current!r}, not {requested!r}; use a"
        f" token of workspace {requested!r}"
    )


@contextlib.contextmanager
def acting_for(workspace: str) -> Iterator[None]:
    """Make ``workspace`` the current workspace inside the ``with`` block."""
    token = _current.set(check_workspace(workspace))
    try:
        yield
    finally:
        _current.reset(token)
