"""The drainer's `GET /metrics`: Prometheus text of its registry, on a port of its own.

prometheus-client's WSGI app (content negotiation, gzip, `name[]` filters) behind the standard
library's threading HTTP server, in a daemon thread: scrapes never wait on the drainer's event
loop, and the loop never waits on a scrape. The socket is bound in `__init__`, so that a port in
use is reported before the drainer starts, naming the setting; `close` stops it within a tenth
of a second.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from relay.settings import SettingsError

HOST_SETTING = "RELAY_DRAINER_METRICS_HOST"
PORT_SETTING = "RELAY_DRAINER_METRICS_PORT"
POLL_SECONDS = 0.1


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every few seconds is noise in the journal)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _family(host: str, port: int) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise SettingsError(f"{HOST_SETTING}: cannot listen on {host!r}: {error}") from None
    return infos[0][0]


class MetricsServer:
    """Serves `registry` at `http://host:port/metrics` (and `/`) until `close`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = _family(host, port)

        class Server(ThreadingWSGIServer):
            address_family = family

        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server = make_server(
                host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
            )
        except OSError as error:
            raise SettingsError(_bind_error(error, where, port)) from None
        self.host = host
        self.port: int = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_SECONDS},
            name="drainer-metrics",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _bind_error(error: OSError, where: str, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        return (
            f"{PORT_SETTING}: {where} is already in use (another drainer on this machine?); "
            "choose another port, or `off` to serve no metrics"
        )
    if error.errno == errno.EACCES:
        return f"{PORT_SETTING}: not allowed to listen on port {port} (below 1024 needs privileges)"
    if error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return f"{HOST_SETTING}: cannot listen on {where}: not an address of this machine"
    return f"{HOST_SETTING}/{PORT_SETTING}: cannot listen on {where}: {error.strerror or error}"
