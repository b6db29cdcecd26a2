"""A seeded fault-injecting HTTP reverse proxy on 127.0.0.1, put in front of an S3 server (pipeline.local_s3's moto)
to see what the pipeline does when the object store misbehaves (tests/pipeline/test_faults_s3.py,
benchmarks/reliability_s3.py).

    proc, moto = start_moto_server()
    with FaultProxy(moto, FaultPlan(reset=0.05, http_500=0.05, http_503=0.05, truncate=0.05, seed=1)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # every S3 request of this process now goes through the proxy
        ...
        print(proxy.stats())                        # requests seen, faults injected by kind
        proxy.kill(); proxy.revive()                # an outage: connections refused, then the endpoint is back

What it simulates, per request, with the probabilities of a `FaultPlan`:
- `reset`: the request is forwarded (so it may have been applied: a PUT stored, a DELETE done), then the client's
  connection is closed with a TCP reset and no response: a response lost on the way back.
- `http_500` / `http_503`: an S3-style XML error (`InternalError`, `SlowDown`) without forwarding: a busy server.
- `truncate` (GET only): the true status, headers and Content-Length, then half of the body, then a close.
- `kill()`: the listening socket is closed (new connections are refused at once) and every connection opened before
  is reset when the client next uses it (a kept-alive connection outlives neither a kill nor a revive);
  `revive()` listens on the same port again. `kill_after(n)` kills when the (n+1)-th request from now
  arrives, which makes "the endpoint died mid-ingest" reproducible. `pause()` lets every request through.

A fault is drawn from a hash of (seed, method, request target, how many times this proxy has seen that method and
target), not from one shared random stream, so the same requests meet the same faults however the client's threads
interleave. `max_per_request` caps how many times the same request (method and target) can fail: a flaky network
whose faults clear on retry, as opposed to an outage (with 1, an operation of up to RetryPolicy.attempts - 1
distinct requests always succeeds within its retries); `only` restricts faults to some requests (e.g. `is_delete`);
`limit` caps the faults in all.

What it does not simulate: slow or hanging endpoints (timeouts), corrupted bytes that keep the right length, DNS or
TLS failures, throttling that lasts, eventual consistency, partial writes on the server side (a faulted PUT is either
forwarded whole or not at all), or S3 semantics of its own (it forwards whatever the upstream server answers). It
speaks plain HTTP/1.1 with persistent connections (keep-alive, `Expect: 100-continue`, chunked request bodies);
every request is forwarded on a fresh upstream connection. Standard library only; one thread per client connection.
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

FAULT_KINDS = ("reset", "http_500", "http_503", "truncate")
UPSTREAM_TIMEOUT_S = 30.0  # one forwarded request, upstream (the local moto server answers in milliseconds)
IDLE_TIMEOUT_S = 60.0  # a client connection with no request for this long is closed
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade"})
_ERRORS = {"http_500": (500, "Internal Server Error", "InternalError",
                        "We encountered an internal error. Please try again."),
           "http_503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate.")}
_MAX_LINE = 65536


def is_delete(method: str, target: str) -> bool:
    """True for S3 deletes: DELETE of one object, or the batch DeleteObjects (`POST ...?delete`) s3fs uses."""
    query = urlsplit(target).query
    return method == "DELETE" or (method == "POST" and "delete" in (q.split("=")[0] for q in query.split("&")))


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to inject: a probability per fault kind (per request, summing to at most 1) and how they are drawn.

    seed: the draws depend only on (seed, method, target, repeat count). max_per_request: the same request (method
    and target) fails at most this many times (None: no cap). limit: at most this many faults in all (None: no cap).
    only: a predicate (method, target) -> bool choosing the requests that may fail (None: all).
    """

    reset: float = 0.0
    http_500: float = 0.0
    http_503: float = 0.0
    truncate: float = 0.0
    seed: int = 0
    max_per_request: int | None = None
    limit: int | None = None
    only: Callable[[str, str], bool] | None = None

    def __post_init__(self) -> None:
        probs = [getattr(self, k) for k in FAULT_KINDS]
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-9:
            raise ValueError(f"Expected fault probabilities in [0, 1] summing to at most 1. Got "
                             f"{dict(zip(FAULT_KINDS, probs))}: lower some of them.")
        for name in ("max_per_request", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"Expected {name} a non-negative integer or None. Got {value!r}.")


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of what the proxy did: requests read from clients, how many were forwarded, faults injected by kind,
    requests and connections refused while killed, client connections accepted. Connections the OS refuses while
    the listening socket is closed never reach the proxy and are not counted."""

    requests: int = 0
    forwarded: int = 0
    reset: int = 0
    http_500: int = 0
    http_503: int = 0
    truncate: int = 0
    refused: int = 0
    connections: int = 0

    @property
    def faults(self) -> int:
        return sum(getattr(self, k) for k in FAULT_KINDS)

    def by_kind(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in FAULT_KINDS}

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.by_kind().items())
        return (f"{self.requests} requests ({self.forwarded} forwarded), {self.faults} faults ({kinds}), "
                f"{self.refused} refused while killed")


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def _uniform(seed: int, method: str, target: str, repeat: int) -> float:
    """A number in [0, 1) that depends only on its arguments (not on Python's per-process string hash)."""
    digest = hashlib.blake2b(f"{seed}\0{method}\0{target}\0{repeat}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the client sees its connection reset, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _read_head(rfile) -> tuple[str, str, str, http.client.HTTPMessage] | None:  # noqa: ANN001 - a socket file
    """(method, target, version, headers) of the next request on a connection; None when the client closed it."""
    line = rfile.readline(_MAX_LINE + 1)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(_MAX_LINE + 1)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {line[:80]!r}")
    return parts[0], parts[1], parts[2], http.client.parse_headers(rfile)


def _read_body(rfile, headers: http.client.HTTPMessage) -> bytes:  # noqa: ANN001
    """The request body, by Content-Length or decoded from chunked transfer encoding."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size = int(rfile.readline(_MAX_LINE + 1).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers: dropped
                return b"".join(parts)
            parts.append(rfile.read(size))
            rfile.readline(_MAX_LINE + 1)
    n = int(headers.get("Content-Length") or 0)
    body = rfile.read(n) if n else b""
    if len(body) < n:
        raise ConnectionError("the client closed its connection in the middle of a request body")
    return body


def _head_bytes(status: int, reason: str, headers: list[tuple[str, str]], *, method: str, body_len: int,
                keep_alive: bool) -> bytes:
    """Status line and headers for the client: hop-by-hop headers dropped, the true Content-Length, Connection."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    length = None
    for name, value in headers:
        low = name.lower()
        if low == "content-length":
            length = value
        elif low not in _HOP_BY_HOP:
            lines.append(f"{name}: {value}")
    if method == "HEAD":
        if length is not None:
            lines.append(f"Content-Length: {length}")  # of the body a GET would get; a HEAD response has none
    elif status >= 200 and status not in (204, 304):
        lines.append(f"Content-Length: {body_len}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_response(kind: str, target: str) -> _Response:
    status, reason, code, message = _ERRORS[kind]
    request_id = uuid.uuid4().hex[:16].upper()
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{escape(urlsplit(target).path)}</Resource><RequestId>{request_id}</RequestId></Error>").encode()
    return _Response(status, reason, [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], body)


class FaultProxy:
    """The proxy (module doc). `start()` (or `with`) listens on 127.0.0.1:`port` (0: a free port); `url` is what to
    put in AWS_ENDPOINT_URL; `close()` stops it. `plan` may be replaced at any time (`set_plan`)."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"Expected an upstream like http://127.0.0.1:PORT. Got {upstream!r}: the proxy speaks "
                             "plain HTTP only (point it at pipeline.local_s3's server).")
        self.upstream = upstream
        self.plan = plan or FaultPlan()
        self.host = "127.0.0.1"
        self.port = port
        self._up = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._counts = {f.name: 0 for f in fields(ProxyStats)}
        self._seen: dict[tuple[str, str], int] = {}
        self._faults_of: dict[tuple[str, str], int] = {}
        self._paused = False
        self._killed = True  # not listening until start()
        self._kill_at: int | None = None
        self.killed_at: float | None = None  # time.monotonic() of the last kill (for stop-latency measurements)
        self._conns: set[socket.socket] = set()
        self._generation = 0  # + 1 per kill: a connection accepted in an older generation is dead
        self._serving: threading.Thread | None = None
        self._stop_serving = threading.Event()

    # --- control ----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def killed(self) -> bool:
        """Not serving: before start(), or after kill() / close() until revive()."""
        return self._killed

    def start(self) -> FaultProxy:
        """Listen (again, on the same port after the first time) and serve."""
        with self._lock:
            if not self._killed:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            listener.settimeout(0.05)  # how soon the serving thread notices kill() / close()
            self.port = listener.getsockname()[1]
            self._stop_serving = threading.Event()
            self._serving = threading.Thread(target=self._serve, args=(listener, self._stop_serving),
                                             name=f"fault-proxy-{self.port}", daemon=True)
            self._killed = False
            self._serving.start()
        return self

    def kill(self) -> None:
        """The endpoint dies: stop listening (connections are refused from now on); every open connection is reset
        when its client next sends a request on it (not shut at once: a client writing on a connection that closes
        under it reports an error nobody retrieves, instead of a reset it handles)."""
        with self._lock:
            if not self._killed:
                self.killed_at = time.monotonic()
                self._generation += 1
            self._killed = True
            self._kill_at = None
            serving = self._serving
            self._stop_serving.set()
        if serving is not None and serving is not threading.current_thread():
            serving.join()

    def revive(self) -> None:
        """The endpoint is back, on the same port."""
        self.start()

    def kill_after(self, n_requests: int) -> None:
        """Kill the endpoint when the (n_requests + 1)-th request from now arrives (that one is refused)."""
        with self._lock:
            self._kill_at = self._counts["requests"] + n_requests

    def close(self) -> None:
        """Stop serving: kill(), and shut every open connection (their threads end)."""
        self.kill()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread reading it; it then closes the socket
            except OSError:
                pass

    def pause(self) -> None:
        """Let every request through unharmed until `resume()`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._counts)

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = {f.name: 0 for f in fields(ProxyStats)}

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "killed" if self._killed else ("paused" if self._paused else "injecting")
        return f"FaultProxy({self.url} -> {self.upstream}, {state})"

    # --- serving ----------------------------------------------------------------------------------------------

    def _serve(self, listener: socket.socket, stop: threading.Event) -> None:
        """Accept connections until killed; the listening socket is closed here, so only this thread touches it."""
        try:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(IDLE_TIMEOUT_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    if self._killed:
                        self._counts["refused"] += 1
                        _abort(conn)
                        continue
                    self._counts["connections"] += 1
                    self._conns.add(conn)
                    generation = self._generation
                threading.Thread(target=self._handle, args=(conn, generation), name="fault-proxy-conn",
                                 daemon=True).start()
        finally:
            listener.close()

    def _decide(self, method: str, target: str, generation: int) -> str | None:
        """Count the request and draw its fate: a fault kind, "killed", or None (forward it unharmed)."""
        with self._lock:
            self._counts["requests"] += 1
            if self._killed or generation != self._generation:
                self._counts["refused"] += 1
                return "killed"
            if self._kill_at is not None and self._counts["requests"] > self._kill_at:
                self._counts["refused"] += 1
                return "kill now"
            plan = self.plan
            if self._paused or (plan.only is not None and not plan.only(method, target)) or (
                    plan.limit is not None and sum(self._counts[k] for k in FAULT_KINDS) >= plan.limit):
                return None
            key = (method, target)
            repeat = self._seen.get(key, 0)
            self._seen[key] = repeat + 1
            if plan.max_per_request is not None and self._faults_of.get(key, 0) >= plan.max_per_request:
                return None
            u, edge, kind = _uniform(plan.seed, method, target, repeat), 0.0, None
            for name in FAULT_KINDS:
                edge += getattr(plan, name)
                if u < edge:
                    kind = name
                    break
            if kind == "truncate" and method != "GET":
                kind = None  # only a GET response has a body worth cutting
            if kind is not None:
                self._faults_of[key] = self._faults_of.get(key, 0) + 1
                if kind != "truncate":
                    self._counts[kind] += 1  # a truncation is counted when it happens (the body may be too short)
            return kind

    def _forward(self, method: str, target: str, headers: http.client.HTTPMessage, body: bytes) -> _Response:
        """Send the request upstream on a fresh connection and read the whole response."""
        conn = http.client.HTTPConnection(*self._up, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(method, target, skip_host="Host" in headers, skip_accept_encoding=True)
            for name, value in headers.items():
                if name.lower() not in _HOP_BY_HOP | {"content-length", "expect"}:
                    conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            with self._lock:
                self._counts["forwarded"] += 1
            return _Response(resp.status, resp.reason, resp.getheaders(), data)
        finally:
            conn.close()

    def _handle(self, conn: socket.socket, generation: int) -> None:
        """Serve the requests of one client connection in turn (keep-alive) until it closes or a fault ends it."""
        rfile = conn.makefile("rb")
        abort = False
        try:
            while True:
                head = _read_head(rfile)
                if head is None:
                    return
                method, target, version, headers = head
                if headers.get("Expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers)
                tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
                keep_alive = "close" not in tokens and (version != "HTTP/1.0" or "keep-alive" in tokens)
                fate = self._decide(method, target, generation)
                if fate in ("killed", "kill now"):
                    if fate == "kill now":
                        self.kill()
                    abort = True
                    return
                if fate in _ERRORS:
                    resp = _error_response(fate, target)
                else:
                    try:
                        resp = self._forward(method, target, headers, body)
                    except (OSError, http.client.HTTPException):
                        abort = True  # the upstream server is gone: so is this endpoint, for the client
                        return
                    if fate == "reset":
                        abort = True
                        return
                payload = b"" if method == "HEAD" else resp.body
                head_bytes = _head_bytes(resp.status, resp.reason, resp.headers, method=method,
                                         body_len=len(payload), keep_alive=keep_alive)
                if fate == "truncate" and len(payload) >= 2:
                    with self._lock:
                        self._counts["truncate"] += 1
                    conn.sendall(head_bytes + payload[:len(payload) // 2])
                    abort = True
                    return
                conn.sendall(head_bytes + payload)  # one send: no Nagle / delayed-ACK stall between the two
                if not keep_alive:
                    return
        except (OSError, ValueError, http.client.HTTPException):
            abort = True  # a client that went away, a malformed request, or kill() shutting the socket
        finally:
            with self._lock:
                self._conns.discard(conn)
            rfile.close()
            if abort:
                _abort(conn)
            else:
                conn.close()
