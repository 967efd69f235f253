#!/usr/bin/env python3
"""Fault soak for contact: real processes on loopback, faults at random, then
Jepsen-style accounting of every task. Run through scripts/soak.sh, which
builds the binaries; stdlib only.

    soak.py --bin DIR [--seed N] [--work DIR] [--keep] [SECONDS]

What runs. Two phases, one after the other, each with its own state
directory, results and dead-letter files: `queue` (each task to one client)
and then `broadcast` (every client gets every task). SECONDS (default 60) is
the time under faults, split evenly between them. A phase is one
contact-server with the journal (--state-dir) and 8 contact-client processes
(ids soak-1..soak-8) whose --exec is a cheap `sh -c` that sleeps for the time
written in the task (mostly 0-40 ms, one task in a hundred 0.3-1.5 s) and
prints "ok"; one task in fifty is refused once per client (exit 75, a retry)
the first time that client runs it. Every client dials its own port of a TCP
proxy inside this program, which forwards each connection to the server's
current port. The number of tasks follows the fault window (120 a second of
it in queue mode, 16 a second in broadcast, where each client does each), so
that the work lasts about as long as the faults on two busy cores. Timeouts
are short, so that faults turn into redeliveries within seconds:
--ack-timeout 4, --client-timeout 5, --retry-backoff 0.1..2 (a task may be
refused by each of the 8 clients in turn), keepalive 2 s with 2 s to answer,
clients reconnecting after 0.05-1 s; --max-attempts 50, so that faults alone
do not dead-letter tasks (a dead letter still counts as an outcome).

Faults, from a schedule drawn from the seed (printed; give it back with
--seed or SOAK_SEED to replay the same schedule - the timing of the programs
themselves is of course not replayed): a client killed with SIGKILL and
restarted with the same --id after a moment; a client paused (SIGSTOP) for up
to 8 s, longer than the ack and client timeouts, then resumed (SIGCONT); the
server killed with SIGKILL and restarted on its state directory with an
empty --tasks-from (tasks come from the task file on the first start only:
a restart must not publish them again); and in the proxy, per client, traffic
delayed (1-30 ms a read), sliced (writes split into pieces of a few bytes),
stalled (one or both directions not read for up to 6 s, past the keepalive
timeout) and connections cut (reset or closed). Faults start once the server
has logged that all tasks of the file are published (they are journaled and
fsync'd by then) and stop after the phase's share of SECONDS.

Then the phase drains: faults stop (stalled links flow, paused clients
resume, dead ones restart, the proxy forwards plainly), and the soak waits,
at most --drain seconds, until every task has its outcome, then
--ack-timeout plus 2 s more so that a late second acceptance would show, and
stops everything (clients, then the server, with SIGTERM). Every process it
started is stopped on the way out, however it ends (this program is a child
subreaper, so what a killed client left running is reaped and stopped too;
the server and clients get SIGKILL if this program dies).

Accounting, from the results and dead-letter files. An obligation is a task
in queue mode, and a (client, task) pair in broadcast (every client is alive
at the end, so each is due every task). Each must end with exactly one
accepted result or one dead letter: none is `lost`, more than one is
`duplicated` (both must be 0). `produced` counts obligations, `accepted` and
`dead` those that ended so, `stale` the results recorded as stale,
`redelivered` the results that answered an attempt > 1. Task texts are
unique, so a task published twice (a restart republishing) shows up as a
duplicate too.

Growth. A server killed with SIGKILL comes back as a new process, so growth
is measured on the last server process of each phase: all server kills fall
in the first half of the phase's fault window, so that process lives through
the second half of the faults and the drain. Its VmHWM (peak RSS) and open
descriptors (/proc/PID/fd) are read 3 s after it started (warm-up; at the
latest when the faults end) and again at the end of the drain: the end must
stay within 1.5x the warm-up peak and 10 descriptors. The peak includes the
replay of the journal at start, which can hide later growth, so the current
RSS (VmRSS) must stay within 1.5x too. The summary shows the peaks and
descriptors per phase (q: queue, b: broadcast), the phase lines VmRSS too.

Output: one line per phase (with the faults injected, when its work was
done, how long the drain took), a line per problem found, then the summary

    soak: seed=S seconds=T produced=P accepted=A lost=0 duplicated=0 stale=X
          redelivered=R dead=D rss_kb=q:A->B,b:A->B fds=q:C->D,b:C->D problems=0

(on one line), and the exit status: 0 when nothing was lost, duplicated or
grew; 1 otherwise, or when a program failed (a server that did not restart or
exited on its own, a client that exited on its own, a drain that timed out,
a line of a results file that is not JSON); 2 for a usage error. The work
directory (logs of every process, events.log with the timeline of faults in
the programs' clock, each phase's schedule, state and results) is removed
after a clean run and kept, with its path printed, after a failed one or with
--keep. To see the soak fail, weaken the server: --server-arg=--no-state
(no journal) makes every server kill lose what was unfinished.
"""

import argparse
import asyncio
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

CLIENTS = [f"soak-{i}" for i in range(1, 9)]

# What the programs are told (see the header).
ACK_TIMEOUT = 4
CLIENT_TIMEOUT = 5
MAX_ATTEMPTS = 50
# A task marked to be refused is refused once by each client that runs it,
# up to 8 times in a row: the default backoff (1..60 s, doubling) would make
# its last tries minutes apart, past the drain. Short, and still growing.
RETRY_BACKOFF = "0.1..2"
GRACE = 1
WARM_UP = 3.0

# Faults: events a second over all clients, and the weights of their kinds.
CLIENT_FAULTS = {"kill": 15, "pause": 15, "cut": 25, "stall": 20, "mode": 25}
SERVER_KILLS_EVERY = 5.0  # mean seconds between server kills (plus one sure kill)
MODES = ("clean", "delay", "slice", "delay+slice")

# Tasks: how many a phase gets per second of its fault window (queue: shared
# by all clients; broadcast: done by each), so that work lasts about as long
# as the faults on two shared cores with the debug build.
QUEUE_TASKS_PER_SEC = 120
BROADCAST_TASKS_PER_SEC = 16

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option, arg):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def die_with_parent():
    """Run in each child before exec: SIGKILL it if the soak dies."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Children:
    """Every process the soak starts, so that each is stopped on the way out."""

    def __init__(self):
        self.procs = {}

    def start(self, argv, log_path):
        log = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                # The soak reads task ids from the server's debug line "task N produced".
                env={**os.environ, "RUST_LOG": "info,grpcio=warn,contact::dispatch=debug"},
            )
        finally:
            log.close()
        self.procs[p.pid] = p
        return p

    def forget(self, p):
        self.procs.pop(p.pid, None)

    def orphans(self):
        """Processes re-parented to us (we are a subreaper): what a killed
        client's command left running. Pid -> state letter."""
        me = os.getpid()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self.procs:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == me:
                found[int(entry)] = fields[0]
        return found

    def reap_orphans(self, kill=False):
        for pid, state in self.orphans().items():
            if kill and state != "Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if kill or state == "Z":
                try:
                    os.waitpid(pid, 0 if kill else os.WNOHANG)
                except ChildProcessError:
                    pass

    def stop_all(self):
        for p in list(self.procs.values()):
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        self.reap_orphans(kill=True)


def read_status(pid):
    """VmRSS and VmHWM (kB) and the number of open descriptors of the server."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as e:
        raise Failure(f"server pid {pid} gone when its memory was to be read: {e}") from None
    return out


class Link:
    """The proxy in front of one client: a listening port of its own; every
    connection accepted is forwarded to the server's current port, with this
    link's faults applied."""

    def __init__(self, soak, name, rng):
        self.soak = soak
        self.name = name
        self.rng = rng
        self.mode = "clean"
        self.flowing = {"up": asyncio.Event(), "down": asyncio.Event()}
        self.stalled_until = {"up": 0.0, "down": 0.0}
        for e in self.flowing.values():
            e.set()
        self.conns = set()
        self.accepted = 0

    async def open(self):
        self.listener = await asyncio.start_server(self.accept, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]

    async def close(self):
        self.listener.close()
        self.cut(reset=True)
        await self.listener.wait_closed()

    async def accept(self, down_reader, down_writer):
        self.accepted += 1
        port = self.soak.server_port
        if port is None:
            down_writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 3
            )
        except (OSError, asyncio.TimeoutError):
            down_writer.transport.abort()
            return
        for w in (down_writer, up_writer):
            w.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        conn = (down_writer, up_writer)
        self.conns.add(conn)
        try:
            await asyncio.gather(
                self.pump(down_reader, up_writer, "up", conn),
                self.pump(up_reader, down_writer, "down", conn),
            )
        except asyncio.CancelledError:
            pass  # the soak is ending; asyncio would report a cancelled handler as an error
        finally:
            self.conns.discard(conn)
            for w in conn:
                w.transport.abort()

    async def pump(self, reader, writer, direction, conn):
        """Copies one direction until it ends; an error ends both."""
        try:
            while True:
                await self.flowing[direction].wait()
                data = await reader.read(65536)
                if not data:
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                mode = "clean" if self.soak.calm else self.mode
                if "delay" in mode:
                    await asyncio.sleep(self.rng.uniform(0.001, 0.03))
                if "slice" in mode:
                    await self.sliced(writer, data)
                else:
                    writer.write(data)
                    await writer.drain()
        except Exception:  # a reset, a cut, a write after close: the connection is over
            for w in conn:
                w.transport.abort()

    async def sliced(self, writer, data):
        """Writes data in pieces: a few bytes each at first, so that frame
        headers and messages arrive cut, then up to 4 KiB each."""
        i, small = 0, 256
        while i < len(data):
            n = self.rng.randint(1, 7) if i < small else self.rng.randint(64, 4096)
            writer.write(data[i : i + n])
            await writer.drain()
            i += n
            if self.rng.random() < 0.2:
                await asyncio.sleep(0.002)

    def cut(self, reset):
        """Ends every connection of this link now: with a reset (SO_LINGER 0),
        or by closing (a FIN after what was already written)."""
        for conn in list(self.conns):
            for w in conn:
                if reset:
                    sock = w.transport.get_extra_info("socket")
                    if sock is not None:
                        try:
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        except OSError:
                            pass
                    w.transport.abort()
                else:
                    w.transport.close()

    def stall(self, direction, secs):
        """Stops reading one direction ("up": client to server), or both, for
        secs: TCP's flow control then stops the sender."""
        until = time.monotonic() + secs
        for d in ("up", "down") if direction == "both" else (direction,):
            self.stalled_until[d] = max(self.stalled_until[d], until)
            self.flowing[d].clear()
        asyncio.get_running_loop().call_later(secs, self.flow, False)

    def flow(self, now=True):
        """Lets traffic flow again: what no longer stalls, or (now) everything."""
        for d, e in self.flowing.items():
            if now or time.monotonic() >= self.stalled_until[d] - 0.001:
                self.stalled_until[d] = 0.0
                e.set()


def plan(rng, secs, fault_rate):
    """The phase's fault schedule: (seconds from the start, kind, target, argument)."""
    events = []
    # Server kills only in the first half, so that the last server process
    # lives through the second half of the faults and the drain (growth is
    # measured on it); one for sure, more at random.
    lo, hi = 0.1 * secs, 0.5 * secs
    t = rng.uniform(lo, hi)
    events.append((t, "server-kill", "server", round(rng.uniform(0, 1.5), 3)))
    t = lo
    while True:
        t += rng.expovariate(1 / SERVER_KILLS_EVERY)
        if t >= hi:
            break
        events.append((t, "server-kill", "server", round(rng.uniform(0, 1.5), 3)))
    kinds = list(CLIENT_FAULTS)
    weights = [CLIENT_FAULTS[k] for k in kinds]
    t = 0.0
    while True:
        t += rng.expovariate(fault_rate)
        if t >= secs:
            break
        kind = rng.choices(kinds, weights)[0]
        client = rng.choice(CLIENTS)
        arg = {
            "kill": lambda: round(rng.uniform(0.1, 3), 3),
            "pause": lambda: round(rng.uniform(0.2, 8), 3),
            "cut": lambda: rng.choice(["reset", "close"]),
            "stall": lambda: (rng.choice(["up", "down", "both"]), round(rng.uniform(0.3, 6), 3)),
            "mode": lambda: rng.choice(MODES),
        }[kind]()
        events.append((t, kind, client, arg))
    events.sort(key=lambda e: e[0])
    return events


def task_lines(rng, prefix, n):
    """Unique task texts: name, seconds to sleep, and an `r` for a task each
    client refuses once (exit 75) the first time it runs it."""
    lines = []
    for i in range(1, n + 1):
        if rng.random() < 0.01:
            secs = rng.uniform(0.3, 1.5)
        else:
            secs = rng.uniform(0, 0.04)
        refuse = " r" if rng.random() < 0.02 else ""
        lines.append(f"{prefix}{i:06d} {secs:.3f}{refuse}")
    return lines


class Failure(Exception):
    pass


class Phase:
    """One server and its 8 clients in one dispatch mode: under faults, then
    drained, stopped and accounted for."""

    def __init__(self, soak, mode, secs, seed):
        self.soak = soak
        self.mode = mode
        self.secs = secs
        self.rng = random.Random(f"{seed}-{mode}")
        self.dir = soak.work / mode
        self.dir.mkdir()
        self.state = self.dir / "state"
        self.results = self.dir / "results.jsonl"
        self.dead = self.dir / "dead.jsonl"
        self.server = None
        self.server_starts = 0
        self.server_down = False
        self.clients = {}
        self.client_starts = Counter()
        self.paused = {}
        self.problems = []
        self.counts = Counter()
        self.samples = {}
        self.pending = set()
        self.restarting = None
        self.fatal = None

    # --- processes -------------------------------------------------------

    def log(self, what):
        self.soak.log(f"{self.mode}: {what}")

    def server_argv(self, tasks_from):
        return [
            str(self.soak.bin / "contact-server"),
            "--listen", "127.0.0.1:0",
            "--dispatch", self.mode,
            *(() if "--no-state" in self.soak.server_args else ("--state-dir", str(self.state))),
            "--tasks-from", str(tasks_from),
            "--results-to", str(self.results),
            "--dead-letter", str(self.dead),
            "--ack-timeout", str(ACK_TIMEOUT),
            "--client-timeout", str(CLIENT_TIMEOUT),
            "--max-attempts", str(MAX_ATTEMPTS),
            "--retry-backoff", RETRY_BACKOFF,
            "--grace", str(GRACE),
            "--keepalive", "2",
            "--keepalive-timeout", "2",
            "--stats-every", "1",
            *self.soak.server_args,
        ]

    async def start_server(self, tasks_from):
        self.server_starts += 1
        log_path = self.dir / f"server-{self.server_starts}.log"
        p = self.soak.children.start(self.server_argv(tasks_from), log_path)
        self.server = p
        self.log(f"server started, pid {p.pid}, log {log_path.name}")
        port = await self.wait_log(p, log_path, "listening on ", 60)
        self.soak.server_port = int(port.split()[0].rsplit(":", 1)[1])
        self.server_down = False
        self.spawn(self.sample_warm_up(p))
        return p, log_path

    async def wait_log(self, p, log_path, marker, limit):
        """The rest of the first line of p's log containing marker."""
        deadline = time.monotonic() + limit
        with open(log_path, "rb") as log:
            seen = b""
            while time.monotonic() < deadline:
                seen += log.read()
                lines = seen.split(b"\n")
                seen = lines.pop()  # not complete yet
                for line in lines:
                    text = line.decode(errors="replace")
                    if marker in text:
                        return text.split(marker, 1)[1]
                if p.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        tail = "\n    ".join(log_path.read_text(errors="replace").splitlines()[-8:])
        raise Failure(
            f"{self.mode}: server pid {p.pid} did not log {marker.strip()!r} within {limit} s "
            f"(exit status {p.poll()}); end of {log_path}:\n    {tail}"
        )

    async def sample_warm_up(self, p):
        await asyncio.sleep(WARM_UP)
        if p.poll() is None and p.pid not in self.samples:
            try:
                self.samples[p.pid] = read_status(p.pid)
            except Failure:
                pass  # killed meanwhile

    def exec_command(self, client):
        # The task is the command's last argument, $0 of the script.
        marks = self.dir / "refused" / client
        marks.mkdir(parents=True)
        script = (
            'set -- $0; if [ "$3" = r ] && mkdir ' + str(marks) + '/$1 2>/dev/null; '
            'then echo "refusing $1"; exit 75; fi; sleep $2; echo "ok $1"'
        )
        return f"sh -c '{script}'"

    def start_client(self, client):
        self.client_starts[client] += 1
        n = self.client_starts[client]
        link = self.soak.links[client]
        argv = [
            str(self.soak.bin / "contact-client"),
            "--server", f"127.0.0.1:{link.port}",
            "--id", client,
            "--exec", self.execs[client],
            "--exec-timeout", "20",
            "--status-every", "1",
            "--backoff-initial", "0.05",
            "--backoff-max", "1",
            "--connect-timeout", "3",
            "--ack-interval", "0.1",
            "--keepalive", "2",
        ]
        p = self.soak.children.start(argv, self.dir / f"{client}-{n}.log")
        self.clients[client] = p
        self.log(f"client {client} started, pid {p.pid}, log {client}-{n}.log")

    def spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    # --- faults --------------------------------------------------------------

    async def fault(self, kind, target, arg):
        soak = self.soak
        if kind == "server-kill":
            if self.server_down:
                return
            self.counts["server-kill"] += 1
            self.server_down = True
            soak.server_port = None
            pid = self.server.pid
            self.server.kill()
            self.server.wait()
            soak.children.forget(self.server)
            self.log(f"server pid {pid} killed (SIGKILL); restart in {arg} s")
            self.restarting = asyncio.ensure_future(self.restart_server(arg))
        elif kind == "kill":
            p = self.clients[target]
            if p.poll() is not None:
                return
            self.counts["client-kill"] += 1
            p.kill()
            p.wait()
            soak.children.forget(p)
            self.paused.pop(target, None)
            self.log(f"client {target} pid {p.pid} killed (SIGKILL); restart in {arg} s")
            self.spawn(self.restart_client_later(target, p, arg))
        elif kind == "pause":
            p = self.clients[target]
            if p.poll() is not None or target in self.paused:
                return
            self.counts["client-pause"] += 1
            p.send_signal(signal.SIGSTOP)
            self.paused[target] = p
            self.log(f"client {target} pid {p.pid} paused (SIGSTOP) for {arg} s")
            self.spawn(self.resume_later(target, p, arg))
        elif kind == "cut":
            link = soak.links[target]
            self.counts["cut"] += 1
            self.log(f"proxy {target}: {len(link.conns)} connections cut ({arg})")
            link.cut(reset=arg == "reset")
        elif kind == "stall":
            direction, secs = arg
            link = soak.links[target]
            self.counts["stall"] += 1
            link.stall(direction, secs)
            self.log(f"proxy {target}: {direction} stalled for {secs} s")
        elif kind == "mode":
            self.counts["mode"] += 1
            soak.links[target].mode = arg
            self.log(f"proxy {target}: traffic {arg}")

    async def restart_server(self, delay=0.0):
        """Starts the server again on its state, with no tasks to publish; a
        server that does not come back ends the phase (see `check`)."""
        await asyncio.sleep(delay)
        try:
            await self.start_server(self.empty)
        except Failure as e:
            self.fatal = e

    def check(self):
        if self.fatal is not None:
            raise self.fatal

    async def restart_client_later(self, client, old, delay):
        await asyncio.sleep(delay)
        if self.clients.get(client) is old:
            self.start_client(client)

    async def resume_later(self, client, p, secs):
        await asyncio.sleep(secs)
        if self.paused.get(client) is p:
            del self.paused[client]
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                self.log(f"client {client} pid {p.pid} resumed (SIGCONT)")

    async def watch(self):
        """Notices programs that exit on their own (a finding) and restarts them."""
        while True:
            await asyncio.sleep(0.2)
            self.soak.children.reap_orphans()
            if not self.server_down and self.server.poll() is not None:
                status = self.server.returncode
                self.soak.children.forget(self.server)
                self.problems.append(
                    f"server pid {self.server.pid} exited on its own with status {status} "
                    f"(see server-{self.server_starts}.log)"
                )
                self.log(f"server pid {self.server.pid} exited on its own ({status}); restarting")
                self.server_down = True
                self.soak.server_port = None
                self.restarting = asyncio.ensure_future(self.restart_server())
            for client, p in list(self.clients.items()):
                if p.poll() is not None and p.pid in self.soak.children.procs:
                    self.soak.children.forget(p)
                    self.problems.append(
                        f"client {client} pid {p.pid} exited on its own with status {p.returncode} "
                        f"(see {client}-{self.client_starts[client]}.log)"
                    )
                    self.log(f"client {client} pid {p.pid} exited on its own; restarting")
                    self.start_client(client)

    # --- the phase -------------------------------------------------------------

    async def run(self):
        per_sec = QUEUE_TASKS_PER_SEC if self.mode == "queue" else BROADCAST_TASKS_PER_SEC
        n = max(20, int(per_sec * self.secs * self.soak.load))
        self.tasks = task_lines(self.rng, self.mode[0], n)
        tasks_file = self.dir / "tasks.txt"
        tasks_file.write_text("".join(t + "\n" for t in self.tasks))
        self.empty = self.dir / "no-tasks.txt"
        self.empty.write_text("")
        self.execs = {c: self.exec_command(c) for c in CLIENTS}
        schedule = plan(self.rng, self.secs, self.soak.fault_rate)
        (self.dir / "schedule.txt").write_text(
            "".join(f"{t:9.3f} {k} {who} {arg}\n" for t, k, who, arg in schedule)
        )
        for link in self.soak.links.values():
            link.mode = "clean"
            link.flow()
        self.soak.calm = False
        for link in self.soak.links.values():
            link.accepted = 0
        watcher = None
        try:
            p, log_path = await self.start_server(tasks_file)
            await self.wait_log(p, log_path, f"all {n} tasks from {tasks_file} published", 60)
            for c in CLIENTS:
                self.start_client(c)
            watcher = asyncio.ensure_future(self.watch())
            t0 = time.monotonic()
            self.faults_from = time.time()
            self.log(f"{n} tasks published; faults for {self.secs:g} s ({len(schedule)} planned)")
            for at, kind, target, arg in schedule:
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                self.check()
                await self.fault(kind, target, arg)
            await asyncio.sleep(max(0.0, t0 + self.secs - time.monotonic()))
            await self.calm_down()
            drain = await self.drain()
            watcher.cancel()
            self.check()
            end = read_status(self.server.pid)
            warm = self.samples.get(self.server.pid)
            await self.stop()
        finally:
            if watcher is not None:
                watcher.cancel()
            for task in list(self.pending):
                task.cancel()
            # Whatever still runs after a failure must not meet the next phase.
            for q in [self.server, *self.clients.values()]:
                if q is not None and q.poll() is None:
                    q.kill()
                    q.wait()
                if q is not None:
                    self.soak.children.forget(q)
            self.soak.server_port = None
        return self.account(warm, end, drain)

    async def calm_down(self):
        """Faults stop: every link flows plainly, paused clients resume, dead
        ones restart, a server being restarted is waited for."""
        self.log("faults stop; draining")
        for task in list(self.pending):
            task.cancel()
        self.soak.calm = True
        for link in self.soak.links.values():
            link.flow()
            link.mode = "clean"
        for client, p in list(self.paused.items()):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                self.log(f"client {client} pid {p.pid} resumed (SIGCONT)")
        self.paused.clear()
        for client, p in self.clients.items():
            if p.poll() is not None:
                self.start_client(client)
        if self.restarting is not None:
            await self.restarting
        self.check()
        # The warm-up sample of a last server younger than WARM_UP is taken now.
        if self.server.pid not in self.samples:
            self.samples[self.server.pid] = read_status(self.server.pid)

    async def drain(self):
        """Waits (bounded) until every obligation has its outcome, then
        ACK_TIMEOUT + 2 s more, so that a late second acceptance would show.
        Returns the seconds it took to finish."""
        t0 = time.monotonic()
        deadline = t0 + self.soak.drain
        while (left := self.outstanding()) > 0:
            self.check()
            if time.monotonic() > deadline:
                self.log(f"drain gave up after {self.soak.drain:g} s: {left} without an outcome")
                self.problems.append(
                    f"after {self.soak.drain:g} s of draining {left} obligations had no outcome"
                )
                break
            await asyncio.sleep(1)
        waited = time.monotonic() - t0
        self.log(f"drained in {waited:.1f} s; settling {ACK_TIMEOUT + 2} s")
        await asyncio.sleep(ACK_TIMEOUT + 2)
        return waited

    async def stop(self):
        for client, p in self.clients.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        await self.reap([*self.clients.values()], 10, "client")
        self.server.send_signal(signal.SIGTERM)
        await self.reap([self.server], GRACE + 15, "server")
        self.soak.server_port = None
        self.log("stopped")

    async def reap(self, procs, limit, what):
        deadline = time.monotonic() + limit
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                self.problems.append(f"{what} pid {p.pid} did not stop within {limit} s of SIGTERM")
                p.kill()
                p.wait()
            self.soak.children.forget(p)

    # --- accounting ------------------------------------------------------------

    def read_lines(self, path, final):
        """The JSON lines of path, and what is wrong with it. Until the end
        (final) an unterminated last line is one being written."""
        rows, bad = [], []
        if path.exists():
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n"):
                        if final:
                            bad.append(f"{path.name}:{n}: unterminated last line {raw[:120]!r}")
                        break
                    try:
                        rows.append(json.loads(raw))
                    except ValueError:
                        bad.append(f"{path.name}:{n}: not JSON: {raw[:120]!r}")
        return rows, bad

    def obligations(self):
        """Key of every obligation -> outcomes (accepted results, dead letters)."""
        if self.mode == "queue":
            return {t: [] for t in self.tasks}
        return {(c, t): [] for c in CLIENTS for t in self.tasks}

    def key(self, row):
        return row.get("task") if self.mode == "queue" else (row.get("client"), row.get("task"))

    def outcomes(self, final=False):
        """Obligation -> its outcomes, with the rows read, unreadable lines,
        and outcomes that answer no obligation."""
        results, bad = self.read_lines(self.results, final)
        dead, bad_dead = self.read_lines(self.dead, final)
        table = self.obligations()
        unknown = []
        rows = [("result", r) for r in results if r.get("accepted")] + [("dead", d) for d in dead]
        for what, row in rows:
            outcomes = table.get(self.key(row))
            (unknown if outcomes is None else outcomes).append((what, row))
        return table, results, bad + bad_dead, unknown

    def task_ids(self):
        """Task text -> id, as the first server logged them when it published them."""
        ids = {}
        marker = " produced: "
        with open(self.dir / "server-1.log", errors="replace") as f:
            for line in f:
                if marker in line:
                    head, text = line.rstrip("\n").split(marker, 1)
                    ids[text] = head.rsplit("task ", 1)[1]
        return ids

    def outstanding(self):
        return sum(1 for v in self.outcomes()[0].values() if not v)

    def account(self, warm, end, drain):
        table, results, bad, unknown = self.outcomes(final=True)
        lost = [k for k, v in table.items() if not v]
        duplicated = [k for k, v in table.items() if len(v) > 1]
        ids = defaultdict(set)
        for r in results:
            if r.get("task") is not None:
                ids[r["task"]].add(r.get("task_id"))
        republished = {t: sorted(i) for t, i in ids.items() if len(i) > 1}
        stats = {
            "produced": len(table),
            "accepted": sum(1 for v in table.values() if [o for o, _ in v] == ["result"]),
            "dead": sum(1 for v in table.values() if [o for o, _ in v] == ["dead"]),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "stale": sum(1 for r in results if r.get("stale")),
            "redelivered": sum(1 for r in results if (r.get("attempt") or 1) > 1),
            "refused": sum(1 for r in results if r.get("retry")),
            "failed": sum(1 for r in results if r.get("accepted") and not r.get("ok")),
            "results": len(results),
        }
        # When the last outcome was recorded, counted from the start of the faults.
        times = [o.get("received_at") or o.get("at") or 0 for v in table.values() for _, o in v]
        work = max(0.0, max(times, default=0) - self.faults_from)
        problems = list(self.problems) + bad
        if unknown:
            problems.append(f"{len(unknown)} outcomes answer no task produced: {unknown[0][1]}")
        if republished:
            t, i = next(iter(republished.items()))
            problems.append(f"{len(republished)} tasks recorded under several ids, e.g. {t!r}: {i}")
        if lost:
            ids = self.task_ids()
            problems.append(f"{len(lost)} lost (first 10 listed; task ids from server-1.log):")
        for k in lost[:10]:
            text = k if self.mode == "queue" else k[1]
            who = "" if self.mode == "queue" else f" for client {k[0]}"
            problems.append(f"lost: task {ids.get(text, '?')} {text!r}{who}")
        for k in duplicated[:10]:
            lines = "; ".join(
                f"{what} client={o.get('client')} task_id={o.get('task_id')} "
                f"attempt={o.get('attempt', o.get('attempts'))} seq={o.get('seq')}"
                for what, o in table[k]
            )
            problems.append(f"duplicated: {k}: {lines}")
        grew = []
        for what, key in (("peak RSS (VmHWM)", "VmHWM"), ("RSS (VmRSS)", "VmRSS")):
            if end[key] > 1.5 * warm[key]:
                grew.append(f"{what} {warm[key]} kB -> {end[key]} kB (over 1.5x)")
        if end["fds"] > warm["fds"] + 10:
            grew.append(f"open descriptors {warm['fds']} -> {end['fds']} (over +10)")
        problems += grew
        c = self.counts
        print(
            f"soak[{self.mode}]: tasks={len(self.tasks)} "
            + " ".join(f"{k}={v}" for k, v in stats.items())
            + f" server_kills={c['server-kill']} client_kills={c['client-kill']}"
            f" pauses={c['client-pause']} cuts={c['cut']} stalls={c['stall']}"
            f" connections={sum(link.accepted for link in self.soak.links.values())}"
            f" work={work:.1f}s drain={drain:.1f}s rss_kb={warm['VmHWM']}->{end['VmHWM']}"
            f" (VmRSS {warm['VmRSS']}->{end['VmRSS']}) fds={warm['fds']}->{end['fds']}",
            flush=True,
        )
        for p in problems:
            print(f"soak[{self.mode}]: {p}", flush=True)
        return stats, warm, end, problems


class Soak:
    """The whole run: the proxy links (kept across phases), the phases one
    after the other, the summary."""

    def __init__(self, args):
        self.bin = Path(args.bin)
        self.seed = args.seed
        self.secs = args.seconds
        self.drain = args.drain
        self.load = args.load
        self.fault_rate = args.fault_rate
        self.server_args = args.server_arg
        self.work = args.work
        self.children = Children()
        self.server_port = None
        self.calm = True
        self.t0 = time.monotonic()
        self.events = open(self.work / "events.log", "a", buffering=1)

    def log(self, what):
        """A line of events.log: seconds since the start, and the wall-clock
        time in the form of the programs' logs, to line them up."""
        now = time.time()
        wall = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        self.events.write(f"{time.monotonic() - self.t0:9.3f} {wall} {what}\n")

    async def run(self):
        self.links = {c: Link(self, c, random.Random(f"{self.seed}-{c}")) for c in CLIENTS}
        for link in self.links.values():
            await link.open()
        totals = Counter()
        rss, fds, problems = [], [], []
        try:
            for mode in ("queue", "broadcast"):
                phase = Phase(self, mode, self.secs / 2, self.seed)
                try:
                    stats, warm, end, found = await phase.run()
                except Failure as e:
                    problems.append(str(e))
                    print(f"soak[{mode}]: {e}", flush=True)
                    continue
                totals.update(stats)
                rss.append(f"{mode[0]}:{warm['VmHWM']}->{end['VmHWM']}")
                fds.append(f"{mode[0]}:{warm['fds']}->{end['fds']}")
                problems += found
        finally:
            for link in self.links.values():
                await link.close()
        print(
            f"soak: seed={self.seed} seconds={self.secs:g} produced={totals['produced']} "
            f"accepted={totals['accepted']} lost={totals['lost']} "
            f"duplicated={totals['duplicated']} stale={totals['stale']} "
            f"redelivered={totals['redelivered']} dead={totals['dead']} "
            f"rss_kb={','.join(rss) or '-'} fds={','.join(fds) or '-'} problems={len(problems)}",
            flush=True,
        )
        return not problems


def main():
    ap = argparse.ArgumentParser(
        description="Fault soak for contact: see the header of scripts/soak.py.",
    )
    ap.add_argument(
        "seconds", nargs="?", type=float, default=60.0,
        help="seconds under faults, split between the queue and broadcast phases (default 60)",
    )
    ap.add_argument(
        "--bin", required=True, help="directory holding contact-server and contact-client"
    )
    ap.add_argument(
        "--seed", type=int, default=None,
        help="seed of the fault schedule and the tasks (default: $SOAK_SEED, else random)",
    )
    ap.add_argument(
        "--drain", type=float, default=120.0,
        help="longest wait, per phase, for every task to finish once faults stop (default 120)",
    )
    ap.add_argument(
        "--load", type=float, default=1.0, help="scale the number of tasks (default 1.0)"
    )
    ap.add_argument(
        "--fault-rate", type=float, default=1.5,
        help="client and proxy faults a second (default 1.5)",
    )
    ap.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG",
        help="one more argument for contact-server (repeatable); e.g. --server-arg=--no-state "
        "makes every server kill lose what was in flight, which the soak must report",
    )
    ap.add_argument("--work", help="directory for logs and state (default: a new temporary one)")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory after a clean run"
    )
    args = ap.parse_args()
    if args.seed is None:
        env = os.environ.get("SOAK_SEED", "")
        if env and not env.isdigit():
            ap.error(f"SOAK_SEED must be a non-negative integer, not {env!r}")
        args.seed = int(env) if env else random.SystemRandom().randrange(1, 10**9)
    if args.seconds < 4:
        ap.error(f"SECONDS must be at least 4, not {args.seconds:g}")
    for prog in ("contact-server", "contact-client"):
        if not os.access(Path(args.bin) / prog, os.X_OK):
            ap.error(f"--bin {args.bin}: no executable {prog} there")
    if args.work:
        args.work = Path(args.work)
        try:
            args.work.mkdir(parents=True)
        except OSError as e:
            ap.error(f"--work {args.work}: cannot make a new directory there: {e.strerror}")
    else:
        args.work = Path(tempfile.mkdtemp(prefix="contact-soak."))

    prctl(PR_SET_CHILD_SUBREAPER, 1)
    soak = Soak(args)
    print(f"soak: seed={args.seed} seconds={args.seconds:g} work={args.work}", flush=True)

    async def run_until_signalled():
        """Runs the soak; SIGINT, SIGTERM or SIGHUP cancel it, which stops
        every process on the way out (the `finally` blocks)."""
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(s, main_task.cancel)
        return await soak.run()

    ok = False
    try:
        ok = asyncio.run(run_until_signalled())
    except asyncio.CancelledError:
        print("soak: interrupted", flush=True)
        sys.exit(130)
    finally:
        soak.children.stop_all()
        if ok and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
        else:
            print(f"soak: logs, state and results kept in {args.work}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
