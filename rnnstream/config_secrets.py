"""Secrets in a service configuration: written as references, resolved when the config is loaded, never
printed.

A secret setting (:func:`is_secret_key`: the MQTT ``password``, ``mqtt.tls.key_password``, and every key of
``kafka.client`` / ``kafka.consumer`` / ``kafka.producer`` whose name holds ``password`` or ``secret``, or is
an inline private key such as ``ssl.key.pem``) must be one of:

- ``${env:NAME}``: the value of the environment variable ``NAME`` (it must be set);
- ``${file:/absolute/path}``: the content of that file, its trailing newline removed (how Docker and
  Kubernetes mount secrets).

The secret itself written in the file is refused with an error naming the key (never quoting the value).
A resolved secret is a pydantic ``SecretStr``: ``repr``, ``str``, ``model_dump`` and log lines show
``**********``; :func:`reveal` / :func:`revealed` give the text only to the client library that connects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

SECRET_WORDS = ("password", "secret")
"""A client setting whose name holds one of these is a secret (``sasl_plain_password``, ``ssl.key.password``,
``sasl.oauthbearer.client.secret``, ...)."""
INLINE_KEYS = frozenset({"ssl_key_pem", "ssl_keystore_key"})
"""Settings that carry a private key itself rather than a path to it (librdkafka's ``ssl.key.pem``)."""
_REFERENCE = re.compile(r"\$\{(env|file):([^}]+)\}")
HOW = "write ${env:NAME} or ${file:/absolute/path} instead (the value is not shown)"


def normalized_key(key: object) -> str:
    """A client setting's name in kafka-python's spelling: ``ssl.key.password`` → ``ssl_key_password``."""
    return str(key).lower().replace(".", "_").replace("-", "_")


def is_secret_key(key: object) -> bool:
    """True for a client setting that holds a secret (in either library's spelling)."""
    name = normalized_key(key)
    return name in INLINE_KEYS or any(word in name for word in SECRET_WORDS)


def resolve(key: str, value: object) -> SecretStr:
    """The secret a reference names (``${env:NAME}``, ``${file:/path}``). ``ValueError`` naming ``key``
    (never quoting ``value``) for a literal, an unset variable or an unreadable file."""
    if isinstance(value, SecretStr):  # already resolved (a validated config validated again)
        return value
    match = _REFERENCE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{key}: a secret must come from the environment or a file: {HOW}")
    kind, name = match.groups()
    return SecretStr(_from_env(key, name) if kind == "env" else _from_file(key, name))


def _from_env(key: str, name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"{key}: environment variable {name} is not set")
    return value


def _from_file(key: str, name: str) -> str:
    path = Path(name)
    if not path.is_absolute():
        raise ValueError(f"{key}: ${{file:...}} needs an absolute path, got {name}")
    try:
        return path.read_text().removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path} ({exc.strerror or exc})") from exc


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Client settings with every secret key's reference resolved (:func:`resolve`); others as they are."""
    return {k: resolve(str(k), v) if is_secret_key(k) else v for k, v in settings.items()}


def reveal(value: SecretStr | None) -> str | None:
    """The text of a secret, for the client library that uses it."""
    return None if value is None else value.get_secret_value()


def revealed(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Client settings with their secrets as text, for the client library that uses them."""
    return {k: reveal(v) if isinstance(v, SecretStr) else v for k, v in settings.items()}
