"""Who may talk to `finemed serve`: the Host header a loopback server answers (DNS rebinding: a web page whose
name resolves to 127.0.0.1 reaches a local server with its own name in Host, so a loopback server answers
only to loopback names, as llama-server, Ollama and vLLM do) and, when one is set, the API key every route but /health
needs (`Authorization: Bearer KEY`, as OpenAI's clients send it; the key is read from an environment variable,
never from a command-line flag that `ps` would show).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from finemed_cli.errors import ConfigError
from finemed_cli.serve.protocol import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


def is_loopback(address: str) -> bool:
    """Whether a bound address (as the socket reports it) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def host_name(header: str) -> str | None:
    """The name in a Host header without its port (`[::1]:8080` → `[::1]`), lower-cased; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        name, rest = (header[:end + 1], header[end + 1:]) if end > 0 else ("", "")
    else:
        name, sep, port = header.partition(":")
        rest = sep + port
    if not name or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
        return None
    return name


@dataclass(frozen=True)
class Access:
    """What a request must carry. `hosts`: the names its Host header may give (None: any, for a server bound
    to the network without --allowed-host); `api_key`: the key every route but /health requires (None: no key)."""

    hosts: frozenset[str] | None = frozenset(LOOPBACK_NAMES)
    api_key: str | None = None

    def host_allowed(self, header: str | None) -> bool:
        if self.hosts is None:
            return True
        name = host_name(header) if header is not None else None
        return name is not None and name in self.hosts

    def key_matches(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        # constant-time: the time a wrong key takes says nothing about how much of it was right
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def server_access(bound: str, allowed_hosts: tuple[str, ...], api_key_env: str) -> Access:
    """The Access of a server bound to `bound`: loopback (or any --allowed-host given) checks Host, with the
    loopback names always allowed; the key comes from the environment variable `api_key_env`, if set."""
    key = os.environ.get(api_key_env)
    if key is not None and not key.strip():
        raise ConfigError(f"{api_key_env} is set but empty: set it to the API key clients must send, or unset it")
    names = {h for h in (host_name(a) for a in allowed_hosts) if h}
    bad = [a for a in allowed_hosts if host_name(a) is None]
    if bad:
        raise ConfigError(f"--allowed-host {bad[0]!r} is not a host name (NAME, or NAME:PORT)")
    hosts = frozenset(LOOPBACK_NAMES) | names if is_loopback(bound) or names else None
    return Access(hosts, key.strip() if key else None)


class Guard:
    """ASGI middleware refusing, before any route runs, a request whose Host is not allowed (403) or one
    without the API key (401), with OpenAI's error object. /health needs no key (load balancers); /tokenize,
    /metrics and the rest do, as on llama-server (they run the model or tell what it served)."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[Any]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(scope.get("path", ""), headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, body, extra = refusal
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": orjson.dumps(body)})

    def refusal(self, path: str, headers: dict[str, str]
                ) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]] | None:
        host = headers.get("host")
        if not self.access.host_allowed(host):
            name = host_name(host or "") or host
            return 403, error_body(f"the Host {host!r} is not allowed: this server answers "
                                   f"{', '.join(sorted(self.access.hosts or ()))}; start it with --allowed-host "
                                   f"{name or 'NAME'} to add a name", 403, code="host_not_allowed"), []
        if path != "/health" and not self.access.key_matches(headers.get("authorization")):
            return 401, error_body("this server needs an API key: send the header 'Authorization: Bearer KEY'",
                                   401, code="invalid_api_key"), [(b"www-authenticate", b"Bearer")]
        return None
