"""Parsing of ``scheme:body?key=value&key=value`` spec strings shared by model and data specs."""

from __future__ import annotations

from cswap.errors import CswapError


def parse_spec(spec: str, *, kind: str, help_text: str) -> tuple[str, str, dict[str, str]]:
    """Split a spec into (scheme, body, options). ``fashion-mnist`` has an empty body."""
    text = spec.strip()
    if not text:
        raise CswapError(f"Empty {kind} spec.", f"use {help_text}.")
    head, _, query = text.partition("?")
    scheme, separator, body = head.partition(":")
    if not separator:
        scheme, body = head, ""
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CswapError(
                f"Malformed option {item!r} in {kind} spec {spec!r}.",
                f"write options as ?key=value&key=value ({help_text}).",
            )
        options[key] = value
    return scheme.lower(), body, options
