"""Run a WSGI app (``module:attr``) on wsgiref's server, one thread per request:
``python _http_wsgi_server.py module:attr HOST PORT``."""

from __future__ import annotations

import importlib
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (5 by default): concurrent tests


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    target, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    module, attr = target.split(":")
    app = getattr(importlib.import_module(module), attr)
    with make_server(host, port, app, server_class=_Threading, handler_class=_Quiet) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    main()
