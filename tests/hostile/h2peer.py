#!/usr/bin/env python3
"""A hostile HTTP/2 peer for exercising the contact server (gRPC C-core).

Each subcommand opens plain TCP sockets to a *loopback* target, speaks (or
refuses to speak) HTTP/2 with the h2 project's libraries (h2, hyperframe,
hpack), is bounded by ``--seconds``, and prints one line of JSON saying what
it sent and what came back.  Times in the report are seconds since the first
connection was opened.

  rapid-reset     One connection; as fast as possible: HEADERS for a valid gRPC
                  request (``--path``), optionally a DATA frame carrying an
                  empty gRPC message (``--data``), then RST_STREAM(CANCEL).
                  Keeps reading (acks, window updates, GOAWAY) all along, so
                  it is never stalled by its own neglect; reports streams
                  opened per second and whether/when a GOAWAY came.  With
                  ``--reconnect``, a connection the server closes is replaced
                  by a new one (still one at a time) until ``--seconds``.
  ping-flood      One connection flooding PING frames; reports when the
                  server sends GOAWAY / closes the connection.
  settings-flood  Same with SETTINGS frames (each one obliges an ACK).
  hold            K connections x N streams: HEADERS (optionally the request
                  message), then nothing: never ended, never reset.
  idle            K connections doing the preface and SETTINGS, answering
                  PINGs, never opening a stream; reports how many are still
                  open after ``--seconds`` and when each one was closed.
  preface-less    K TCP connections that send nothing at all.
  oversized       One gRPC request whose length prefix exceeds the limit
                  (``--length``); sends up to ``--body`` bytes of it as flow
                  control allows, then prints grpc-status/grpc-message.
  malformed       One gRPC request carrying a broken message (``--kind``):
                  invalid protobuf, non-gRPC garbage, a compressed flag with
                  no encoding, or a truncated message; prints the trailers.

rapid-reset, ping-flood, settings-flood and hold drive the connection frame
by frame (hyperframe frames, an HPACK block encoded once with literal
never-indexed fields, so it stays valid for every stream): per-stream h2
state machines in Python would cap the attack at a rate that measures Python,
not the server.  The other subcommands use h2.H2Connection.

Examples (server on 127.0.0.1:PORT):

  h2peer.py rapid-reset --target 127.0.0.1:PORT --seconds 10 --path /Contact/getTask --data
  h2peer.py ping-flood --target 127.0.0.1:PORT --seconds 5
  h2peer.py idle --target 127.0.0.1:PORT --connections 200 --seconds 30
  h2peer.py preface-less --target 127.0.0.1:PORT --connections 50 --seconds 130
  h2peer.py oversized --target 127.0.0.1:PORT --length 1048577
  h2peer.py malformed --target 127.0.0.1:PORT --kind bad-proto

Only loopback targets are accepted.
"""

import argparse
import collections
import ipaddress
import json
import os
import resource
import select
import socket
import struct
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ERRORS = {e.value: e.name for e in h2.errors.ErrorCodes}
MAX_CONNECTIONS = 5000
MAX_SECONDS = 600

# Frame types, for hand-built frames.
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0x0, 0x1, 0x3, 0x4, 0x6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


# ---------------------------------------------------------------- helpers


def target(text):
    """host:port -> (family, sockaddr, authority); loopback only."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    family, _, _, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    if not ipaddress.ip_address(addr[0]).is_loopback:
        raise argparse.ArgumentTypeError(f"{text!r}: only loopback targets are allowed")
    return family, addr, text


def grpc_headers(path, authority, client_id=None):
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if client_id:
        headers.append(("contact-client-id", client_id))
    return headers


def grpc_message(payload=b"", compressed=False, length=None):
    """The gRPC length-prefixed framing of one message."""
    n = len(payload) if length is None else length
    return struct.pack(">BI", 1 if compressed else 0, n) + payload


def frame(ftype, flags, stream_id, payload=b""):
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, stream_id) + payload


def connect(family, addr, timeout=5.0):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    return s


def emit(report):
    print(json.dumps(report, sort_keys=False), flush=True)


def rounded(t):
    return None if t is None else round(t, 3)


# ------------------------------------------------- frame-level connection


class RawPeer:
    """One HTTP/2 client connection driven frame by frame.

    Answers what the server asks for (SETTINGS ACK, PING ACK, connection
    WINDOW_UPDATE for received DATA), decodes header blocks to keep HPACK
    state in step, and records GOAWAY and the connection's end.
    """

    def __init__(self, tgt, read=True, decode_headers=True):
        family, addr, self.authority = tgt
        self.t0 = time.monotonic()
        self.sock = connect(family, addr)
        self.read = read
        self.out = bytearray()
        self.inbuf = bytearray()
        self.decoder = Decoder()
        self.received = collections.Counter()
        self.goaway = None
        self.closed_at = None
        self.close_reason = None
        self.peer_settings = {}
        self.send_window = 65535  # connection-level, for our DATA
        self.pings_acked = 0
        self.settings_acked = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.block = None  # header block being assembled (HEADERS + CONTINUATION)
        # Decoding every response header block in Python is slow enough to
        # throttle a flood; without it HPACK state is lost (headers unread).
        self.decode_headers = decode_headers
        # Preface, our SETTINGS (no push), and a large connection window so
        # that the server is never blocked writing to us.
        self.out += PREFACE
        self.out += SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize()
        self.out += WindowUpdateFrame(0, window_increment=(1 << 30)).serialize()

    def now(self):
        return time.monotonic() - self.t0

    @property
    def closed(self):
        return self.closed_at is not None

    def close(self, reason):
        if self.closed_at is None:
            self.closed_at = self.now()
            self.close_reason = reason
        try:
            self.sock.close()
        except OSError:
            pass

    def pump(self, timeout):
        """Waits up to `timeout` for the socket, then reads and writes what it can."""
        if self.closed:
            return
        rlist = [self.sock] if self.read else []
        wlist = [self.sock] if self.out else []
        if not rlist and not wlist:
            time.sleep(timeout)
            return
        r, w, _ = select.select(rlist, wlist, [], timeout)
        if r:
            self._read()
        if w and not self.closed:
            self._write()

    def _write(self):
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(f"send: {e.strerror or e}")
            return
        self.bytes_sent += n
        del self.out[:n]

    def _read(self):
        for _ in range(64):
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close(f"recv: {e.strerror or e}")
                break
            if not chunk:
                self.close("eof")
                break
            self.bytes_received += len(chunk)
            self.inbuf += chunk
            self._parse()

    def _parse(self):
        names = {HEADERS: "HEADERS", RST_STREAM: "RSTSTREAM", 0x9: "CONTINUATION"}
        while len(self.inbuf) >= 9:
            ftype = self.inbuf[3]
            if not self.decode_headers and ftype in names:
                # counted, not parsed: keeps a flood from being throttled by us
                end = 9 + int.from_bytes(self.inbuf[:3], "big")
                if len(self.inbuf) < end:
                    return
                self.received[names[ftype]] += 1
                del self.inbuf[:end]
                continue
            try:
                f, length = Frame.parse_frame_header(memoryview(self.inbuf[:9]))
            except HyperframeError:
                # Unknown frame type: skip it.
                length = int.from_bytes(self.inbuf[:3], "big")
                if len(self.inbuf) < 9 + length:
                    return
                self.received["UNKNOWN"] += 1
                del self.inbuf[: 9 + length]
                continue
            if len(self.inbuf) < 9 + length:
                return
            f.parse_body(memoryview(self.inbuf[9 : 9 + length]))
            del self.inbuf[: 9 + length]
            self._on_frame(f)

    def _on_frame(self, f):
        self.received[type(f).__name__.replace("Frame", "").upper()] += 1
        if isinstance(f, SettingsFrame):
            if "ACK" in f.flags:
                self.settings_acked += 1
            else:
                self.peer_settings.update(f.settings)
                self.out += SettingsFrame(0, flags=["ACK"]).serialize()
        elif isinstance(f, PingFrame):
            if "ACK" in f.flags:
                self.pings_acked += 1
            else:
                self.out += PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]).serialize()
        elif isinstance(f, GoAwayFrame):
            if self.goaway is None:
                self.goaway = {
                    "at": rounded(self.now()),
                    "error": ERRORS.get(f.error_code, f.error_code),
                    "last_stream_id": f.last_stream_id,
                    "debug": f.additional_data.decode("utf-8", "replace")[:200],
                }
        elif isinstance(f, WindowUpdateFrame):
            if f.stream_id == 0:
                self.send_window += f.window_increment
        elif isinstance(f, DataFrame):
            if f.flow_controlled_length:
                self.out += WindowUpdateFrame(0, window_increment=f.flow_controlled_length).serialize()
        elif isinstance(f, (HeadersFrame, ContinuationFrame)) and self.decode_headers:
            self.block = (self.block or b"") + f.data
            if "END_HEADERS" in f.flags:
                try:
                    self.decoder.decode(self.block)
                except HPACKError:
                    pass
                self.block = None

    def report(self):
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_received": dict(self.received),
            "peer_settings": {str(k): v for k, v in self.peer_settings.items()},
            "goaway": self.goaway,
            "closed_at": rounded(self.closed_at),
            "close_reason": self.close_reason,
        }


# ---------------------------------------------------------------- floods


def cmd_rapid_reset(a):
    family, addr, authority = a.target
    block = Encoder().encode(
        [NeverIndexedHeaderTuple(k, v) for k, v in grpc_headers(a.path, authority, a.client_id)])
    headers_prefix = frame(HEADERS, END_HEADERS, 0, block)[:5]  # length, type, flags
    empty = grpc_message()
    data_prefix = frame(DATA, 0, 0, empty)[:5]
    rst_prefix = struct.pack(">I", 4)[1:] + bytes([RST_STREAM, 0])
    cancel = struct.pack(">I", h2.errors.ErrorCodes.CANCEL)

    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0
    opened = 0
    per_second = []
    stalled_on_window = 0.0
    connections = []  # one report per connection
    while now() < a.seconds and (a.max_streams is None or opened < a.max_streams):
        peer = RawPeer(a.target, decode_headers=False)
        sid = 1
        first = opened
        while not peer.closed and now() < a.seconds:
            second = int(now())
            while len(per_second) <= second:
                per_second.append(0)
            made = 0
            if (len(peer.out) < (256 << 10) and sid < (1 << 31)
                    and (a.max_streams is None or opened < a.max_streams)):
                batch = bytearray()
                for _ in range(a.batch):
                    if a.data and peer.send_window < len(empty):
                        break
                    sidb = struct.pack(">I", sid)
                    batch += headers_prefix + sidb + block
                    if a.data:
                        batch += data_prefix + sidb + empty
                        peer.send_window -= len(empty)
                    batch += rst_prefix + sidb + cancel
                    sid += 2
                    made += 1
                    if sid >= (1 << 31) or (a.max_streams is not None and opened + made >= a.max_streams):
                        break
                peer.out += batch
                opened += made
                per_second[second] += made
            if made == 0 and a.data and peer.send_window < len(empty):
                t = time.monotonic()
                peer.pump(0.05)
                stalled_on_window += time.monotonic() - t
            else:
                peer.pump(0 if made else 0.05)
        # Flush what is queued (briefly) and see whether the server reacts late.
        linger_end = now() + (a.linger if now() >= a.seconds else 0.2)
        while not peer.closed and now() < linger_end:
            peer.pump(0.05)
        r = peer.report()
        r.update({"opened_at": rounded(peer.t0 - t0), "streams": opened - first,
                  "unsent_bytes": len(peer.out)})
        peer.close("done")
        connections.append(r)
        if not a.reconnect:
            break
    report = {
        "command": "rapid-reset",
        "path": a.path,
        "data": a.data,
        "seconds": a.seconds,
        "streams_opened": opened,
        "resets_sent": opened,
        "streams_per_second": per_second,
        "stalled_on_connection_window_s": round(stalled_on_window, 3),
        "connections": len(connections),
        "goaways": sum(1 for c in connections if c["goaway"]),
        "closed_by_server": sum(1 for c in connections if c["closed_at"] is not None),
        # streams the server says it processed (GOAWAY last_stream_id), where known
        "streams_accepted_per_goaway": sum((c["goaway"]["last_stream_id"] + 1) // 2
                                           for c in connections if c["goaway"]),
    }
    if a.reconnect:
        # the first and the last connection in full, the rest summarised
        report["first_connection"] = connections[0]
        report["last_connection"] = connections[-1]
        report["streams_per_connection_max"] = max(c["streams"] for c in connections)
        report["goaway_errors"] = dict(collections.Counter(
            f'{c["goaway"]["error"]}:{c["goaway"]["debug"]}' for c in connections if c["goaway"]))
    else:
        report.update(connections[0])
    emit(report)


def cmd_ping_flood(a):
    peer = RawPeer(a.target, read=not a.no_read)
    sent = 0
    while not peer.closed and peer.now() < a.seconds:
        if len(peer.out) < (64 << 10):
            batch = bytearray()
            for _ in range(a.batch):
                batch += frame(PING, 0, 0, struct.pack(">Q", sent))
                sent += 1
            peer.out += batch
        peer.pump(0 if len(peer.out) < (64 << 10) else 0.05)
    report = {"command": "ping-flood", "seconds": a.seconds, "read": not a.no_read,
              "pings_queued": sent, "unsent_bytes": len(peer.out), "ping_acks": peer.pings_acked}
    report.update(peer.report())
    peer.close("done")
    emit(report)


def cmd_settings_flood(a):
    peer = RawPeer(a.target, read=not a.no_read)
    sent = 0
    # Alternate a harmless setting so every frame is a real change to apply.
    payloads = [
        SettingsFrame(0, settings={SettingsFrame.MAX_HEADER_LIST_SIZE: 16384 + i}).serialize()
        for i in range(2)
    ]
    while not peer.closed and peer.now() < a.seconds:
        if len(peer.out) < (64 << 10):
            batch = bytearray()
            for _ in range(a.batch):
                batch += payloads[sent & 1]
                sent += 1
            peer.out += batch
        peer.pump(0 if len(peer.out) < (64 << 10) else 0.05)
    report = {"command": "settings-flood", "seconds": a.seconds, "read": not a.no_read,
              "settings_queued": sent, "unsent_bytes": len(peer.out),
              "settings_acks": peer.settings_acked}
    report.update(peer.report())
    peer.close("done")
    emit(report)


def cmd_hold(a):
    """K connections x N streams: HEADERS (and with --data an empty message),
    never END_STREAM, never reset; held open for --seconds."""
    family, addr, authority = a.target
    block = Encoder().encode(
        [NeverIndexedHeaderTuple(k, v) for k, v in grpc_headers(a.path, authority, a.client_id)])
    t0 = time.monotonic()
    peers = []
    for _ in range(a.connections):
        peer = RawPeer(a.target)
        for i in range(a.streams):
            sid = 2 * i + 1
            peer.out += frame(HEADERS, END_HEADERS, sid, block)
            if a.data:
                peer.out += frame(DATA, 0, sid, grpc_message())
        peers.append(peer)
    while time.monotonic() - t0 < a.seconds and any(not p.closed for p in peers):
        for p in peers:
            p.pump(0.01)
    received = collections.Counter()
    for p in peers:
        received.update(p.received)
    emit({
        "command": "hold", "path": a.path, "data": a.data, "seconds": a.seconds,
        "connections": a.connections, "streams_per_connection": a.streams,
        "frames_received": dict(received),
        "closed_by_server": sum(1 for p in peers if p.closed),
        "goaways": dict(collections.Counter(f'{p.goaway["error"]}:{p.goaway["debug"]}'
                                           for p in peers if p.goaway)),
        "peer_settings": {str(k): v for k, v in peers[0].peer_settings.items()},
    })
    for p in peers:
        p.close("done")


# ------------------------------------------------------ many connections


def check_connections(k):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if k > MAX_CONNECTIONS or k + 32 > soft:
        sys.exit(f"--connections {k}: at most {min(MAX_CONNECTIONS, soft - 32)} here")


def cmd_idle(a):
    check_connections(a.connections)
    family, addr, _ = a.target
    t0 = time.monotonic()
    conns = []
    for i in range(a.connections):
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        c.initiate_connection()
        s = connect(family, addr)
        s.setblocking(True)
        s.sendall(c.data_to_send())
        s.setblocking(False)
        conns.append({"i": i, "sock": s, "h2": c, "closed_at": None, "goaway": None, "pings": 0, "why": None})
    opened_in = time.monotonic() - t0
    live = {c["sock"]: c for c in conns}
    while live and time.monotonic() - t0 < a.seconds:
        r, _, _ = select.select(list(live), [], [], 0.2)
        for s in r:
            c = live[s]
            try:
                data = s.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                data, c["why"] = b"", f"recv: {e.strerror or e}"
            if data:
                try:
                    for ev in c["h2"].receive_data(data):
                        if isinstance(ev, h2.events.PingReceived):
                            c["pings"] += 1
                        elif isinstance(ev, h2.events.ConnectionTerminated) and c["goaway"] is None:
                            c["goaway"] = {"at": rounded(time.monotonic() - t0),
                                           "error": ERRORS.get(ev.error_code, ev.error_code),
                                           "debug": (ev.additional_data or b"").decode("utf-8", "replace")[:200]}
                    out = c["h2"].data_to_send()
                    if out:
                        s.setblocking(True)
                        s.sendall(out)
                        s.setblocking(False)
                    continue
                except (h2.exceptions.ProtocolError, OSError) as e:
                    c["why"] = f"{type(e).__name__}: {e}"
            c["closed_at"] = time.monotonic() - t0
            c["why"] = c["why"] or "eof"
            del live[s]
            s.close()
    for s in live:
        s.close()
    closed = [c for c in conns if c["closed_at"] is not None]
    emit({
        "command": "idle",
        "seconds": a.seconds,
        "connections": a.connections,
        "opened_in_s": round(opened_in, 3),
        "still_open": a.connections - len(closed),
        "closed": len(closed),
        "pings_answered": sum(c["pings"] for c in conns),
        "goaways": sum(1 for c in conns if c["goaway"]),
        "first_goaway": next((c["goaway"] for c in conns if c["goaway"]), None),
        "closed_at": sorted(rounded(c["closed_at"]) for c in closed),
        "close_reasons": dict(collections.Counter(c["why"] for c in closed)),
    })


def cmd_preface_less(a):
    check_connections(a.connections)
    family, addr, _ = a.target
    t0 = time.monotonic()
    socks = {}
    for i in range(a.connections):
        s = connect(family, addr)
        socks[s] = {"i": i, "bytes": 0, "closed_at": None, "why": None}
    opened_in = time.monotonic() - t0
    live = dict(socks)
    while live and time.monotonic() - t0 < a.seconds:
        r, _, _ = select.select(list(live), [], [], 0.2)
        for s in r:
            c = live[s]
            try:
                data = s.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                data, c["why"] = b"", f"recv: {e.strerror or e}"
            if data:
                c["bytes"] += len(data)  # the server's SETTINGS, and maybe a GOAWAY
                continue
            c["closed_at"] = time.monotonic() - t0
            c["why"] = c["why"] or "eof"
            del live[s]
            s.close()
    for s in live:
        s.close()
    closed = [c for c in socks.values() if c["closed_at"] is not None]
    emit({
        "command": "preface-less",
        "seconds": a.seconds,
        "connections": a.connections,
        "opened_in_s": round(opened_in, 3),
        "still_open": a.connections - len(closed),
        "closed": len(closed),
        "bytes_received_per_connection": sorted(set(c["bytes"] for c in socks.values())),
        "closed_at_min": rounded(min((c["closed_at"] for c in closed), default=None)),
        "closed_at_max": rounded(max((c["closed_at"] for c in closed), default=None)),
        "close_reasons": dict(collections.Counter(c["why"] for c in closed)),
    })


# ------------------------------------------------------- broken messages


class OneCall:
    """One gRPC call over h2.H2Connection: send, then collect the answer."""

    def __init__(self, tgt, path, client_id):
        family, addr, authority = tgt
        self.t0 = time.monotonic()
        self.sock = connect(family, addr)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 30)
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, grpc_headers(path, authority, client_id))
        self.headers = None
        self.trailers = None
        self.reset = None
        self.goaway = None
        self.closed_at = None
        self.data_received = 0
        self.body_sent = 0
        self.status_at = None
        self.inbuf = bytearray()
        self.odd_frames = 0  # frames on a stream already closed
        self.protocol_error = None
        self.flush()

    def now(self):
        return time.monotonic() - self.t0

    def flush(self):
        out = self.conn.data_to_send()
        if out and self.closed_at is None:
            self.sock.setblocking(True)
            self.sock.settimeout(5)
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed_at = self.now()
            self.sock.setblocking(False)

    @property
    def done(self):
        return (self.trailers is not None or self.reset is not None
                or self.closed_at is not None or self.protocol_error is not None)

    def step(self, timeout):
        if self.closed_at is not None:
            time.sleep(timeout)
            return
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.closed_at = self.now()
            return
        # Feed h2 one frame at a time: a frame it rejects (C-core 1.56 may
        # repeat a trailers-only HEADERS after its RST_STREAM) must not make
        # it drop the events of the frames before it.
        self.inbuf += data
        events = []
        while len(self.inbuf) >= 9:
            end = 9 + int.from_bytes(self.inbuf[:3], "big")
            if len(self.inbuf) < end:
                break
            one = bytes(self.inbuf[:end])
            del self.inbuf[:end]
            try:
                events += self.conn.receive_data(one)
            except h2.exceptions.StreamClosedError:
                self.odd_frames += 1
            except h2.exceptions.ProtocolError as e:
                # h2 refuses to go on with this connection; the server did not close it.
                self.protocol_error = f"{type(e).__name__}: {e}"
                break
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.headers = dict(ev.headers)
                if ev.stream_ended:  # trailers-only response
                    self.trailers, self.status_at = dict(ev.headers), self.now()
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers, self.status_at = dict(ev.headers), self.now()
            elif isinstance(ev, h2.events.DataReceived):
                self.data_received += len(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset = {"at": rounded(self.now()),
                              "error": ERRORS.get(ev.error_code, ev.error_code)}
            elif isinstance(ev, h2.events.ConnectionTerminated) and self.goaway is None:
                self.goaway = {"at": rounded(self.now()),
                               "error": ERRORS.get(ev.error_code, ev.error_code),
                               "debug": (ev.additional_data or b"").decode("utf-8", "replace")[:200]}
        self.flush()

    def send_body(self, body, end, deadline, filler=0):
        """Sends `body` then `filler` zero bytes as flow control allows, until
        all is sent, the call is answered, or `deadline`."""
        view = memoryview(body)
        zeros = bytes(1 << 16)
        left = len(body) + filler
        while left and not self.done and self.now() < deadline:
            try:
                window = min(self.conn.local_flow_control_window(self.sid),
                             self.conn.max_outbound_frame_size, left)
            except h2.exceptions.StreamClosedError:
                break
            if window <= 0:
                self.step(0.05)
                continue
            if view:
                chunk = view[:window].tobytes()
                view = view[len(chunk):]
            else:
                chunk = zeros[:window]
            self.conn.send_data(self.sid, chunk)
            self.body_sent += len(chunk)
            left -= len(chunk)
            self.flush()
            self.step(0)
        if end and not left and not self.done:
            try:
                self.conn.end_stream(self.sid)
                self.flush()
            except h2.exceptions.ProtocolError:
                pass

    def wait(self, deadline):
        while not self.done and self.now() < deadline:
            self.step(0.1)

    def report(self):
        t = self.trailers or {}
        return {
            "grpc_status": t.get("grpc-status"),
            "grpc_message": t.get("grpc-message"),
            "status_at": rounded(self.status_at),
            "http_status": (self.headers or {}).get(":status"),
            "stream_bytes_sent": self.body_sent,  # prefix + body
            "response_data_bytes": self.data_received,
            "stream_reset": self.reset,
            "goaway": self.goaway,
            "closed_at": rounded(self.closed_at),
            "frames_after_close": self.odd_frames,
            "protocol_error": self.protocol_error,
        }


def cmd_oversized(a):
    call = OneCall(a.target, a.path, a.client_id)
    body_len = a.length if a.body is None else a.body
    # The 5-byte prefix declares `length`; then `body_len` zero bytes (not a
    # valid message: the size check should come first).
    call.send_body(grpc_message(b"", length=a.length), end=not a.no_end,
                   deadline=a.seconds, filler=body_len)
    call.wait(a.seconds)
    report = {"command": "oversized", "path": a.path, "declared_length": a.length,
              "body_bytes_planned": body_len}
    report.update(call.report())
    call.sock.close()
    emit(report)


MALFORMED = {
    # invalid protobuf: field 1 as a string whose length runs past the end
    "bad-proto": lambda: grpc_message(b"\x0a\x7f" + b"x" * 3),
    # a gRPC-framed payload with a wire type 7 (invalid) tag
    "bad-wire-type": lambda: grpc_message(b"\x0f\x01\x02\x03"),
    # not gRPC framing at all
    "garbage": lambda: b"\xde\xad\xbe\xef GET / HTTP/1.1\r\n\r\n" + os.urandom(32),
    # compressed flag set, but no grpc-encoding header
    "bad-flag": lambda: grpc_message(b"\x0a\x01x", compressed=True),
    # prefix says 100 bytes, the stream ends after 10
    "truncated": lambda: grpc_message(b"\x0a\x08abcdefgh", length=100),
}


def cmd_malformed(a):
    call = OneCall(a.target, a.path, a.client_id)
    call.send_body(MALFORMED[a.kind](), end=True, deadline=a.seconds)
    call.wait(a.seconds)
    report = {"command": "malformed", "path": a.path, "kind": a.kind}
    report.update(call.report())
    call.sock.close()
    emit(report)


# ------------------------------------------------------------------- CLI


def seconds(text):
    v = float(text)
    if not 0 < v <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_SECONDS}]")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_, default_seconds):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--target", type=target, default=target("127.0.0.1:50051"),
                        help="loopback HOST:PORT (default 127.0.0.1:50051)")
        sp.add_argument("--seconds", type=seconds, default=default_seconds,
                        help=f"how long to run (default {default_seconds})")
        return sp

    paths = ["/Contact/tellResult", "/Contact/getTask", "/Contact/sendStatus"]
    rr = add("rapid-reset", "HEADERS (+DATA) + RST_STREAM at full speed", 10)
    rr.add_argument("--path", default="/Contact/tellResult", choices=paths)
    rr.add_argument("--data", action="store_true", help="send an empty gRPC message before the reset")
    rr.add_argument("--client-id", help="send contact-client-id (default: none, an ephemeral peer)")
    rr.add_argument("--batch", type=int, default=200, help="streams queued per write (default 200)")
    rr.add_argument("--max-streams", type=int, help="stop after this many streams")
    rr.add_argument("--linger", type=float, default=0.5, help="seconds to keep reading afterwards")
    rr.add_argument("--reconnect", action="store_true",
                    help="when the server closes the connection, open another (one at a time)")
    rr.set_defaults(func=cmd_rapid_reset)

    for name, func in (("ping-flood", cmd_ping_flood), ("settings-flood", cmd_settings_flood)):
        sp = add(name, f"flood {name.split('-')[0].upper()} frames on one connection", 5)
        sp.add_argument("--batch", type=int, default=100, help="frames queued per write")
        sp.add_argument("--no-read", action="store_true", help="never read the server's answers")
        sp.set_defaults(func=func)

    sp = add("hold", "K connections x N streams opened and held (never ended, never reset)", 30)
    sp.add_argument("--path", default="/Contact/getTask", choices=paths)
    sp.add_argument("--data", action="store_true", help="send the (empty) request message")
    sp.add_argument("--client-id")
    sp.add_argument("--connections", type=int, default=1)
    sp.add_argument("--streams", type=int, default=100, help="streams per connection")
    sp.set_defaults(func=cmd_hold)

    sp = add("idle", "K connections that never open a stream", 30)
    sp.add_argument("--connections", type=int, default=100)
    sp.set_defaults(func=cmd_idle)

    sp = add("preface-less", "K TCP connections that send nothing", 130)
    sp.add_argument("--connections", type=int, default=50)
    sp.set_defaults(func=cmd_preface_less)

    sp = add("oversized", "a message whose length prefix exceeds the limit", 10)
    sp.add_argument("--path", default="/Contact/tellResult", choices=paths)
    sp.add_argument("--client-id")
    sp.add_argument("--length", type=int, default=(1 << 20) + 1,
                    help="declared message length (default 1 MiB + 1)")
    sp.add_argument("--body", type=int, help="body bytes to send (default: --length)")
    sp.add_argument("--no-end", action="store_true", help="do not end the stream after the body")
    sp.set_defaults(func=cmd_oversized)

    sp = add("malformed", "a broken message; prints the trailers", 10)
    sp.add_argument("--path", default="/Contact/tellResult", choices=paths)
    sp.add_argument("--client-id")
    sp.add_argument("--kind", default="bad-proto", choices=sorted(MALFORMED))
    sp.set_defaults(func=cmd_malformed)

    a = p.parse_args(argv)
    if getattr(a, "batch", 1) < 1:
        p.error("--batch must be at least 1")
    if getattr(a, "length", 0) is not None and getattr(a, "length", 0) > 0xFFFFFFFF:
        p.error("--length must fit in 32 bits")
    a.func(a)


if __name__ == "__main__":
    main()
