"""One quick look at whether a download can start, before a library sits through its own retries.

Hugging Face's hub retries an unreachable host five times (about 40 s) and urllib waits on the system's resolver;
a user without a network wants to hear so at once, with the way to go on offline. :func:`unreachable_reason`
opens one TCP connection to the host (or to the proxy urllib and the hub would use), bounded by ``timeout``
seconds in all, name resolution included.

Example::

    reason = unreachable_reason("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    if reason is not None:   # e.g. "download.pytorch.org is unreachable ([Errno -2] Name or service not known)"
        raise ConnectionError(f"cannot download resnet18's weights: {reason}")
"""
from __future__ import annotations

import socket
import threading
import urllib.request
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

__all__ = ["unreachable_reason", "CHECK_TIMEOUT_S"]

# Long enough for a slow but working network to open one connection, short enough to fail "at once".
CHECK_TIMEOUT_S = 5.0

_DEFAULT_PORTS = {"https": 443, "http": 80}


def _endpoint(url: str) -> Tuple[str, int, str]:
    """(host, port, how to name it) of the first hop a download of ``url`` takes: the proxy, if one applies."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return host, port, host
    proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_host = proxy_parts.hostname or ""
    proxy_port = proxy_parts.port or _DEFAULT_PORTS.get(proxy_parts.scheme, 80)
    return proxy_host, proxy_port, f"{host} (through the proxy {proxy_host}:{proxy_port})"


def unreachable_reason(url: str, *, timeout: float = CHECK_TIMEOUT_S) -> Optional[str]:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` seconds; else why not, in words.

    Honours ``https_proxy`` / ``http_proxy`` / ``no_proxy`` as urllib does. Only the connection is tried: a host
    that answers may still refuse the download, which the caller's own error handling reports.
    """
    host, port, name = _endpoint(url)
    if not host:
        return f"{url!r} names no host"
    outcome: Dict[str, BaseException] = {}

    def connect() -> None:
        try:
            # getaddrinfo ignores socket timeouts; the thread (joined with a timeout) bounds it instead.
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=connect, name="auglocal-fx-reachability", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"{name} did not answer within {timeout:g} s"
    error = outcome.get("error")
    if error is None:
        return None
    detail = f"[Errno {error.errno}] {error.strerror}" if error.errno is not None and error.strerror else str(error)
    return f"{name} is unreachable ({detail or type(error).__name__})"
