"""Optional API keys: ``X-API-Key`` must equal ``api_key`` (when set) on every route but health and the UI
files; gallery writes need ``admin_key`` (when set) in the same header. Compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from service.errors import ApiError
from service.state import ServiceState, get_state

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key (admin key for gallery writes), when configured"
)


def _matches(given: str | None, expected: SecretStr | None) -> bool:
    if expected is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "ApiKey"})


def require_reader(
    request: Request, key: str | None = Security(api_key_header), state: ServiceState = Depends(get_state)
) -> None:
    settings = state.settings
    if settings.api_key is None:
        return
    if key is None:
        raise _unauthorized("missing X-API-Key header")
    if not (_matches(key, settings.api_key) or _matches(key, settings.admin_key)):
        raise _unauthorized("wrong API key")


def require_admin(
    request: Request, key: str | None = Security(api_key_header), state: ServiceState = Depends(get_state)
) -> None:
    settings = state.settings
    if settings.admin_key is None:
        require_reader(request, key, state)
        return
    if key is None:
        raise _unauthorized("missing X-API-Key header (gallery writes need the admin key)")
    if _matches(key, settings.admin_key):
        return
    if _matches(key, settings.api_key):
        raise ApiError(403, "forbidden", "this key may search but not change the gallery; use the admin key")
    raise _unauthorized("wrong API key")
