"""The one error type users see: a single line that names the key or file and what to do; and the input
readers and OSError wording that turn a damaged file or an I/O fault into such a line."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any


class PipelineError(Exception):
    """A user-facing failure. The message is one line and names the offending key or file."""


class ConfigError(PipelineError):
    """A composed config that the schema rejects."""


# Credentials never reach what we print or write (console, MLflow, pending records): `redact` masks them. In a
# URL: the userinfo (scheme://user:password@host, up to the last @ before the path, as urlsplit reads it) and
# the values of query parameters that carry credentials (tokens, signed-URL signatures: S3, GCS, Azure SAS).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s\"'<>`]+@")
_QUERY_SECRETS = re.compile(
    r"([?&;](?:token|access_token|refresh_token|id_token|auth|auth_token|api_key|apikey|key|password|passwd|pwd|"
    r"secret|client_secret|code|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential)=)[\w%+/=.~:-]+", re.IGNORECASE)  # the value's URL-safe characters
# An Authorization header's value ("Authorization: Basic dXNlcjpwdw==", "Bearer eyJ..."), as a library may print it.
_AUTH_HEADER = re.compile(r"(\bBearer\s+|\bAuthorization[\"']?\s*[:=]\s*[\"']?(?:Basic\s+|Token\s+|Bearer\s+)?)"
                          r"[A-Za-z0-9+/=._~-]{8,}")
# Environment variables holding secrets (HF_TOKEN, MLFLOW_TRACKING_PASSWORD/TOKEN, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID, *_API_KEY, ...): whole name parts, so TOKENIZERS_PARALLELISM is not one.
_SECRET_ENV = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CONNECTION_STRING)(_|$)")
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words; URL forms are masked whatever their length


def _secret_values() -> list[str]:
    """Values of secret environment variables, and passwords in the userinfo of any URL in the environment
    (MLFLOW_TRACKING_URI, HF_ENDPOINT), read at each call: a secret set in-process is masked too."""
    values = [v for k, v in os.environ.items() if _SECRET_ENV.search(k.upper())]
    for value in os.environ.values():
        for m in re.finditer(r"://([^/?#\s@]*)@", value):
            user, colon, password = m.group(1).partition(":")
            values.append(password if colon else user)  # https://<token>@host carries the token alone
    return sorted({v for v in values if len(v) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with credentials masked as ***: URL userinfo, credential query parameters, Authorization header
    values and the values of secret environment variables."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _QUERY_SECRETS.sub(r"\1***", text)
    text = _AUTH_HEADER.sub(r"\1***", text)
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


# What to do about an OSError, by errno: the one line a stage or the CLI prints names the file and this.
_OS_FIXES = {
    errno.EACCES: "permission denied; give the user running the pipeline access to it (chmod/chown) or use another path",
    errno.EPERM: "operation not permitted; give the user running the pipeline access to it or use another path",
    errno.EROFS: "read-only file system; run the pipeline from a writable checkout",
    errno.ENOSPC: "no space left on device; free some space (e.g. dvc gc -w) or move the project to a larger disk",
    errno.EDQUOT: "disk quota exceeded; free some space (e.g. dvc gc -w) or move the project to a larger disk",
    errno.EFBIG: "file too large for this file system or `ulimit -f`; raise the limit or use another disk",
    errno.ENOENT: "not found; check the path",
    errno.ENOTDIR: "a component of the path is not a directory; check the path",
    errno.EEXIST: "already exists (a file where a directory is needed?); check the path",
    errno.EISDIR: "is a directory, expected a file; check the path",
}
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def os_fix(e: OSError) -> str:
    """What went wrong and what to do, for an OSError (without the file name)."""
    return _OS_FIXES.get(e.errno) or (e.strerror or str(e) or type(e).__name__).splitlines()[0]


def one_line(e: OSError | UnicodeDecodeError) -> str:
    """The one-line message of a foreseeable I/O fault that reached an entry point: the file, then what to do."""
    if isinstance(e, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
    return redact(f"{names or type(e).__name__}: {os_fix(e)}")  # a library's message may hold a URL


def read_text(path: Path | str, fix: str) -> str:
    """path's text, which must be UTF-8; `fix` says what to do when it is not."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None


def read_json(path: Path | str, fix: str, expect: type | None = dict) -> Any:
    """path parsed as JSON (a JSON object unless `expect` says otherwise); `fix` says what to do when it is not."""
    text = read_text(path, fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    if expect is not None and not isinstance(data, expect):
        wanted = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise PipelineError(f"{path}: expected {wanted}, got {type(data).__name__}; {fix}")
    return data
