"""Encryption of secrets at rest (Fernet), and the HMAC used for widget identity verification."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from chat_domain.errors import ConfigError, SecretDecryptionError


class SecretBox:
    """Encrypts and decrypts secrets with the platform key.

    The key string may hold several Fernet keys separated by commas: the first encrypts, all of
    them decrypt, so a key can be rotated by prepending a new one and re-encrypting later.
    """

    __slots__ = ("_fernet",)

    def __init__(self, key: str) -> None:
        keys = [part.strip() for part in key.split(",") if part.strip()]
        if not keys:
            raise ConfigError("the secret key is empty")
        try:
            self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in keys])
        except (ValueError, UnicodeEncodeError) as exc:
            raise ConfigError("the secret key is not a valid Fernet key") from exc

    def __repr__(self) -> str:
        return "SecretBox(<hidden>)"

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode("ascii")

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise SecretDecryptionError("stored secret cannot be decrypted with the key") from None

    def encrypt_json(self, value: dict[str, Any]) -> str:
        return self.encrypt(json.dumps(value, separators=(",", ":"), sort_keys=True))

    def decrypt_json(self, token: str) -> dict[str, Any]:
        value = json.loads(self.decrypt(token))
        if not isinstance(value, dict):
            raise SecretDecryptionError("stored secret blob is not a JSON object")
        return value


def sign_visitor_id(secret: str, visitor_id: str) -> str:
    """HMAC-SHA256 (hex) of a widget visitor id, computed by the customer's backend."""
    return hmac.new(secret.encode("utf-8"), visitor_id.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_visitor_signature(secret: str, visitor_id: str, signature: str) -> bool:
    # Compared as bytes: compare_digest raises TypeError on a str that is not ASCII, and the
    # signature comes from the client.
    expected = sign_visitor_id(secret, visitor_id).encode("ascii")
    given = signature.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(expected, given)
