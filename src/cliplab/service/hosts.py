"""The Host-header check: the service answers only requests addressed to a name it is served under.

DNS rebinding lets a web page on ``evil.example`` point its own name at 127.0.0.1 and read a loopback server's
answers (a user's searches, their images) from the page: the browser then sends ``Host: evil.example``. The
guard answers 400 to any Host that is not allowed. Allowed are the bound address itself, the loopback names
(``localhost``, ``127.0.0.1``, ``::1``) when bound to loopback, and for a wildcard bind (``0.0.0.0``, ``::``)
any IP literal (a rebinding page cannot make a browser send one for its own name), the loopback names and this
machine's host names; plus what ``--allowed-hosts`` adds: exact names, ``*.example.org`` for a domain's
sub-domains, or ``*`` to switch the check off. The port is not compared.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from fastapi.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The host part of a Host header, lower-cased, without port, IPv6 brackets or a trailing dot."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AllowedHosts:
    """Which Host headers a server bound to ``bind`` answers (see the module docstring)."""

    def __init__(self, bind: str = "127.0.0.1", extra: Iterable[str] = ()):
        bind = host_name(bind or "")
        names: set[str] = set()
        self.any_ip = self.any = False
        if bind in WILDCARDS:
            self.any_ip = True
            names.update(LOOPBACK_NAMES)
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    names.add(host_name(name))
        else:
            names.add(bind)
            if _is_loopback(bind):
                names.update(LOOPBACK_NAMES)
        suffixes = []
        for entry in extra:
            for part in str(entry).split(","):
                part = host_name(part)
                if part == "*":
                    self.any = True
                elif part.startswith("*."):
                    suffixes.append(part[1:])
                elif part:
                    names.add(part)
        self.names = frozenset(names)
        self.suffixes = tuple(suffixes)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        name = host_name(header)
        return (name in self.names or (self.any_ip and _is_ip(name))
                or any(name.endswith(suffix) for suffix in self.suffixes))

    def describe(self) -> str:
        shown = sorted(self.names) + [f"*{s}" for s in self.suffixes] + (["any IP address"] if self.any_ip else [])
        return "any host" if self.any else ", ".join(shown)


class HostGuard:
    """ASGI middleware: 400 for an HTTP or WebSocket request whose Host header is not allowed."""

    def __init__(self, app, allowed: AllowedHosts):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.allowed.allows(header):
            return await self.app(scope, receive, send)
        shown = repr(host_name(header)[:80]) if header else "(none)"
        # the answer names no allowed host: a rebinding page can read it, and it must learn nothing
        response = JSONResponse({"detail": f"Host {shown} is not a name this server answers (DNS-rebinding "
                                           "guard); serve it under that name with cliplab serve --allowed-hosts "
                                           "NAME"}, status_code=400)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        return await response(scope, receive, send)
