"""Bearer JWTs between the backend and the service: HS256, `exp` required, audience `ml-service`.

The same secret signs both ways: the backend signs its `POST /infer` calls, the service signs
its completion callbacks. A token signed with `ML_SERVICE_TOKEN_PREVIOUS` is accepted too, so
the secret can be rotated without downtime: set the new one, keep the old one as previous,
roll the replicas, then move the backend to the new secret and drop the previous.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from consumer.errors import AuthError
from schemas.errors import ErrorCode

AUDIENCE = "ml-service"
ALGORITHM = "HS256"
PLACEHOLDER_SECRET = "change_me_secure_token"
# Leeway for clocks a little apart between the backend and the service.
_LEEWAY_S = 30


def issue_token(secret: str, ttl_s: float = 300.0, subject: str = "ml-service", **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": subject, "aud": AUDIENCE, "iat": now, "exp": now + int(ttl_s), "jti": uuid.uuid4().hex}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthError("an Authorization: Bearer <JWT> header is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


def verify_token(token: str, secrets: Sequence[str]) -> dict[str, Any]:
    """The token's claims when one of `secrets` signed it; AuthError otherwise."""
    expired = False
    for secret in secrets:
        if not secret:
            continue
        try:
            return jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                leeway=_LEEWAY_S,
                options={"require": ["exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            expired = True
        except jwt.InvalidSignatureError:
            continue
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"the token lacks the '{error.claim}' claim", code=ErrorCode.TOKEN_INVALID) from error
        except jwt.InvalidAudienceError as error:
            raise AuthError(f"the token's audience is not '{AUDIENCE}'", code=ErrorCode.TOKEN_INVALID) from error
        except jwt.InvalidTokenError as error:
            raise AuthError(f"the token is not a valid JWT: {error}", code=ErrorCode.TOKEN_INVALID) from error
    if expired:
        raise AuthError("the token has expired", code=ErrorCode.TOKEN_EXPIRED)
    raise AuthError("the token's signature does not match the service's secret", code=ErrorCode.TOKEN_INVALID)


def weak_secret(secret: str) -> str | None:
    """Why `secret` must not protect a service, or None when it may."""
    if not secret:
        return "ML_SERVICE_TOKEN is empty"
    if secret == PLACEHOLDER_SECRET:
        return f"ML_SERVICE_TOKEN is the placeholder '{PLACEHOLDER_SECRET}'"
    return None


@dataclass(frozen=True)
class BearerAuth:
    """Who may call POST /infer: a token signed with one of `secrets`; anyone when there is no
    secret and the operator allowed an insecure start (`dev`)."""

    secrets: tuple[str, ...]
    allow_insecure: bool = False

    def check(self, authorization: str | None) -> None:
        """Returns when the caller may run a job; raises AuthError otherwise."""
        if not self.secrets:
            if self.allow_insecure:
                return
            raise AuthError("the service has no ML_SERVICE_TOKEN configured")
        verify_token(bearer_token(authorization), self.secrets)
