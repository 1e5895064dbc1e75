"""Credentials never printed: every message, log line and MLflow field that may hold a URI or an
environment value goes through ``redact``.

What counts as a secret in text: URL user-info (``scheme://user:pass@host`` and the scheme-less
``user:pass@host``), credential-like query parameters (``?password=``, ``token``, ``sig``,
``X-Amz-*``...), the values of secret-looking environment variables, and the Ray auth token that
RAY_AUTH_TOKEN_PATH points at. Imports nothing heavy, so entry points can use it before anything.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["redact", "has_credentials", "RedactingFilter", "install_log_redaction", "SECRET_NAME"]

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|API_KEY|AUTH", re.I)
# user-info with a scheme (http://u:p@h) or without one (u:p@h.example:5000): a word, a colon, a
# non-space run, then '@' followed by a host. A plain e-mail address (no colon before '@') is not matched.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<info>[^\s/@:'\"]+:[^\s/@'\"]*)@(?=[\w.\[-])")
_SCHEME_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]+@")
# Query parameters that carry credentials: passwords, tokens, signatures, keys, AWS presigned fields.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[\w.-]*(?:password|passwd|pwd|token|secret|sig|signature|credential|api[_-]?key|"
    r"access[_-]?key|auth)[\w.-]*|x-amz-[\w-]+|x-goog-[\w-]+|key))=(?P<value>[^&;#\s'\"]+)", re.I)


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds URL user-info or a credential query parameter."""
    return bool(_SCHEME_USERINFO.search(text) or _USERINFO.search(text) or _QUERY_SECRET.search(text))


def redact(value: Any) -> str:
    """``str(value)`` with secret environment values, URL user-info and credential query
    parameters replaced by ``***``."""
    text = str(value)
    for secret in _secret_values():
        if secret in text:
            text = text.replace(secret, "***")
    text = _SCHEME_USERINFO.sub(lambda m: m.group()[: m.group().index("://") + 3] + "***@", text)
    text = _USERINFO.sub(lambda m: (m.group("scheme") or "") + "***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('key')}=***", text)


def _secret_values() -> list[str]:
    """Values of secret-looking environment variables, and the Ray auth token that
    RAY_AUTH_TOKEN_PATH points at (the environment holds only its path)."""
    values = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8
              and k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")]
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        try:
            token = Path(token_path).read_text().strip()
        except OSError:
            token = ""
        if len(token) >= 8:
            values.append(token)
    return sorted(values, key=len, reverse=True)  # a longer secret first: one may contain another


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments applied) through ``redact``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Every handler of the root logger redacts what it writes (call after ``basicConfig``)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
