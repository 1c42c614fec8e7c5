"""The wire: what crosses between serval's processes, and how.

``protocol`` (frames: a small header, a pickle-5 body, out-of-band buffers), ``transport``
(a framed connection over a Unix socket), ``messages`` (every message, typed, defined once),
``rpc`` (control calls and pushes over a connection), ``control`` (the typed stubs of every
control call), ``types`` (the vocabulary both sides share: app specs, replica tables),
``asgi`` (an HTTP request's scope on its way to a replica), ``layout`` (where endpoints and
files live in a cluster's runtime directory).

May import: ``serval.exceptions``, ``serval.config``, ``serval.status`` and ``telemetry`` (a
leaf) — nothing else of serval's, so that every other room can import it.
"""
