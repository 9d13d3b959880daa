"""Optional API keys: ``X-API-Key`` must equal ``api_key`` (when set) on every route but health and the UI
files; gallery writes need ``admin_key`` (when set) in the same header. Compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from service.api.deps import StateDep
from service.api.errors import ApiError
from service.settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key (admin key for gallery writes), when configured"
)


def _matches(given: str | None, expected: SecretStr | None) -> bool:
    if expected is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "ApiKey"})


KeyHeader = Annotated[str | None, Security(api_key_header)]


# The checks are ``async`` (they never block) so that FastAPI runs them on the loop, not in a thread.


def _check_reader(key: str | None, settings: Settings) -> None:
    if settings.api_key is None:
        return
    if key is None:
        raise _unauthorized("missing X-API-Key header")
    if not (_matches(key, settings.api_key) or _matches(key, settings.admin_key)):
        raise _unauthorized("wrong API key")


async def require_reader(key: KeyHeader, state: StateDep) -> None:
    _check_reader(key, state.settings)


async def require_admin(key: KeyHeader, state: StateDep) -> None:
    settings = state.settings
    if settings.admin_key is None:
        _check_reader(key, settings)
        return
    if key is None:
        raise _unauthorized("missing X-API-Key header (gallery writes need the admin key)")
    if _matches(key, settings.admin_key):
        return
    if _matches(key, settings.api_key):
        raise ApiError(403, "forbidden", "this key may search but not change the gallery; use the admin key")
    raise _unauthorized("wrong API key")


ReaderKey = Depends(require_reader)  # for ``dependencies=[...]``: any configured key may read
AdminKey = Depends(require_admin)  # gallery writes: the admin key when one is set
