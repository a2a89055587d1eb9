"""Redaction: the one place that turns a configuration into something safe to write or log.

Secrets are `input.storage_options`, `output.storage_options` (keys, tokens, endpoints with
credentials), `input.passwords` and every value that Hydra resolved from the environment
(`${oc.env:…}`). Every writer of configuration to outputs or logs goes through `redacted_config`;
`SecretFilter` scrubs the same values from log lines, `scrub` from any other text.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

REDACTED = "<redacted>"
SECRET_FIELDS = (("input", "storage_options"), ("output", "storage_options"), ("input", "passwords"))
_MIN_LEN = 4  # shorter values are not scrubbed from free text (they would mangle ordinary words)

# dotted paths of config values resolved from the environment, noted by `note_env_paths`
_env_paths: set[str] = set()
_secrets: set[str] = set()


def note_env_paths(dcfg: Any) -> None:
    """Record which keys of the composed (unresolved) DictConfig come from `${oc.env:…}`."""
    from omegaconf import OmegaConf

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif isinstance(node, str) and "oc.env" in node:
            _env_paths.add(prefix.rstrip("."))

    walk(OmegaConf.to_container(dcfg, resolve=False), "")


def _get(d: Any, path: list[str]) -> Any:
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and p.isdigit() and int(p) < len(d):
            d = d[int(p)]
        else:
            return None
    return d


def _set(d: Any, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        d = d[int(p)] if isinstance(d, list) else d.get(p)
        if d is None:
            return
    if isinstance(d, list) and path[-1].isdigit():
        d[int(path[-1])] = value
    elif isinstance(d, dict) and path[-1] in d:
        d[path[-1]] = value


def _leaves(v: Any) -> list[str]:
    if isinstance(v, dict):
        return [s for x in v.values() for s in _leaves(x)]
    if isinstance(v, (list, tuple)):
        return [s for x in v for s in _leaves(x)]
    return [str(v)] if v is not None and v != "" else []


def _mask(v: Any) -> Any:
    """Keep the structure (which keys were set), hide every value."""
    if isinstance(v, dict):
        return {k: _mask(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_mask(x) for x in v]
    return REDACTED


def secret_values(cfg: Any) -> set[str]:
    """The plain-text secret values of `cfg` (a PipelineConfig), to scrub from any text."""
    d = asdict(cfg)
    out = {s for a, b in SECRET_FIELDS for s in _leaves(d[a][b])}
    out |= {s for p in _env_paths for s in _leaves(_get(d, p.split(".")))}
    return {s for s in out if len(s) >= _MIN_LEN}


def register(cfg: Any) -> None:
    """Remember `cfg`'s secrets so that `scrub` and `SecretFilter` hide them (also password-file
    contents: `register_values`)."""
    _secrets.update(secret_values(cfg))


def register_values(values: Any) -> None:
    _secrets.update(s for s in _leaves(values) if len(s) >= _MIN_LEN)


def scrub(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def redacted_config(cfg: Any) -> dict[str, Any]:
    """`asdict(cfg)` with every secret masked: the form of the config that may be written or logged."""
    d = asdict(cfg)
    for a, b in SECRET_FIELDS:
        d[a][b] = _mask(d[a][b])
    for p in _env_paths:
        path = p.split(".")
        if _get(d, path) is not None:
            _set(d, path, _mask(_get(d, path)))
    secrets = secret_values(cfg) | _secrets

    def deep(v: Any) -> Any:  # a secret copied into another field (e.g. a URI) is hidden there too
        if isinstance(v, dict):
            return {k: deep(x) for k, x in v.items()}
        if isinstance(v, list):
            return [deep(x) for x in v]
        if isinstance(v, str):
            for s in sorted(secrets, key=len, reverse=True):
                v = v.replace(s, REDACTED)
        return v

    return deep(d)


class SecretFilter(logging.Filter):
    """Scrubs registered secrets from every log record passing a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            msg = record.getMessage()
            clean = scrub(msg)
            if clean != msg:
                record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """Attach `SecretFilter` to every handler of the root logger (call after logging is set up)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, SecretFilter) for f in h.filters):
            h.addFilter(SecretFilter())
