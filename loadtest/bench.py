#!/usr/bin/env python3
"""SPACE benchmark harness: CPU per request of space vs nginx vs HAProxy.

Starts, in a temporary directory and on free 127.0.0.1 ports:

  * a backend nginx (one worker, keep-alive, fixed body from memory), started
    under SCHED_BATCH (`chrt -b 0`) and pinned to the proxy CPU;
  * three reverse proxies pinned to the same CPU, one worker/thread each:
    nginx, HAProxy and space (`space run --config space.toml`), each with a
    plain HTTP and a TLS listener (self-signed certificate made with openssl);

then drives them with wrk (pinned to the client CPU), alternating the proxies
A B C A B C ... for --rounds rounds per scenario, and reports per proxy the
median requests/s, p50/p99 latency, the proxy's CPU microseconds per request
(utime+stime from /proc/<pid>/stat summed over the proxy's processes, divided
by the requests wrk completed) and the backend's CPU microseconds per request.

Standard library only (Python 3.11). See loadtest/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATES = HERE / "templates"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# tool -> Debian package that provides it
TOOLS = {
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "taskset": "util-linux",
    "chrt": "util-linux",
    "openssl": "openssl",
}
PROXY_ORDER = ("nginx", "haproxy", "space")


class BenchError(Exception):
    """A failure that should be reported without a traceback."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------

# Names of the fragment slots the templates expose. A scenario can put text
# into any of them; the harness fills the others with "".
FRAGMENT_SLOTS = {
    # backend-nginx.conf: inside the server {} block
    "BACKEND_SERVER",
    # proxy-nginx.conf: main context, http {}, upstream {}, location / {}
    "NGINX_MAIN", "NGINX_HTTP", "NGINX_UPSTREAM", "NGINX_LOCATION",
    # proxy-haproxy.cfg: global, defaults, both frontends, backend
    "HAPROXY_GLOBAL", "HAPROXY_DEFAULTS", "HAPROXY_FRONTEND", "HAPROXY_BACKEND",
    # proxy-space.toml: [server] table, after [tls] (new top-level tables),
    # inside the [[module]] table before its instances
    "SPACE_SERVER", "SPACE_TOP", "SPACE_MODULE",
}


@dataclass
class Scenario:
    """One load pattern. Add new ones to SCENARIOS (section "Scenario definitions").

    name              identifier used on the command line and in reports
    description       one line for the report
    tls               drive the proxies' TLS listener (https://) instead of HTTP
    path              URL path wrk requests (with the default static request)
    wrk_args          extra wrk arguments (e.g. ["-H", "Cookie: a=b"])
    lua               extra Lua for wrk (init/setup/request/response...); the
                      harness appends templates/wrk-report.lua, which defines
                      done(), so do not define done() here. A callable gets the
                      run context (Ctx) and returns the Lua text; it is called
                      after the proxies are up and `ready` ran.
    backend_instances number of upstream instances; the single backend nginx
                      listens on that many ports and every proxy gets them all
    fragments         {slot: text} config fragments per proxy, see FRAGMENT_SLOTS
                      (prepare may add to ctx.fragments, e.g. a port it chose)
    proxies           the proxies the scenario applies to (None = all); the
                      others are left out of it ("n/a") even if --proxies names them
    group             scenarios with the same group that are selected together
                      run interleaved: one backend, all their proxies up at once,
                      runs alternating off/on/on/off... (see --no-interleave)
    needs             extra tools the scenario needs (e.g. ("etcd",))
    prepare/during/cleanup  hooks: prepare(ctx) once before the proxies start,
                      during(ctx, proxy_name) -> context manager wrapped around
                      each measured run (e.g. etcd churn in a thread); what it
                      yields, if a dict, is stored in the run as
                      "scenario_info" when the block ends (its "warnings" list
                      becomes run warnings); cleanup(ctx) after the scenario.
    ready             ready(ctx, proxy) after a proxy passed the generic sanity
                      checks (also with --check-only): scenario-specific checks
                      and set-up that needs the proxy (e.g. learn routing
                      cookies). Returns a dict stored under the proxy's
                      "scenario_check" (its "warnings" become report warnings);
                      raise BenchError to stop.
    check_run         check_run(ctx, run) -> list of warnings, after each run
    """

    name: str
    description: str
    tls: bool = False
    path: str = "/"
    wrk_args: list[str] = field(default_factory=list)
    lua: str | Callable[["Ctx"], str] = ""
    backend_instances: int = 1
    fragments: dict[str, str] = field(default_factory=dict)
    proxies: tuple[str, ...] | None = None
    group: str | None = None
    needs: tuple[str, ...] = ()
    prepare: Callable[["Ctx"], None] | None = None
    during: Callable[["Ctx", str], contextlib.AbstractContextManager] | None = None
    cleanup: Callable[["Ctx"], None] | None = None
    ready: Callable[["Ctx", "Proxy"], dict] | None = None
    check_run: Callable[["Ctx", dict], list[str]] | None = None

    def lua_text(self, ctx: "Ctx") -> str:
        return self.lua(ctx) if callable(self.lua) else self.lua

    def applicable(self, proxies: list[str]) -> list[str]:
        return [p for p in proxies if self.proxies is None or p in self.proxies]


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, val in values.items():
        text = text.replace("{{" + key + "}}", str(val))
    left = re.findall(r"\{\{([A-Z0-9_]+)\}\}", text)
    if left:
        raise BenchError(f"template {template}: unfilled placeholders {sorted(set(left))}")
    return text


def free_ports(n: int) -> list[int]:
    """Bind n sockets to 127.0.0.1:0 at once (so the ports are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_text(cmd: list[str], timeout: float = 10) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    m = re.match(r"(https?)://([^:/]+):(\d+)(/.*)?$", url)
    if not m:
        raise ValueError(url)
    scheme, host, port, path = m.group(1), m.group(2), int(m.group(3)), m.group(4) or "/"
    if scheme == "https":
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        sctx.check_hostname = False
        sctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=sctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "space-bench"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


# /proc readers -------------------------------------------------------------

def proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, utime, stime, starttime) in clock ticks, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); field n is rest[n - 3]
    return int(rest[1]), int(rest[11]), int(rest[12]), int(rest[19])


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st:
                children.setdefault(st[0], []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_line(cpu: int) -> dict[str, int]:
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts[0] == f"cpu{cpu}":
            return dict(zip(names, map(int, parts[1:9])))
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def client_ports(server_port: int) -> set[int]:
    """Local ports of established IPv4 connections whose remote port is server_port
    (the load generator's side of its connections to the proxy)."""
    ports = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[2].split(":")[1], 16) == server_port:
                ports.add(int(f[1].split(":")[1], 16))
    return ports


class ConnWatch:
    """Samples wrk's connections to the proxy shortly after the start and shortly
    before the end of a run. With keep-alive intact they are the same sockets;
    if the proxy closes connections, wrk reconnects from new ports. Unlike
    system-wide TCP counters this is not disturbed by other processes."""

    def __init__(self, port: int, duration: float):
        self.port, self.first, self.last = port, set(), set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(min(1.0, duration / 4), duration), daemon=True)

    def _run(self, t_first: float, duration: float) -> None:
        t0 = time.monotonic()
        if self._stop.wait(t_first):
            return
        self.first = client_ports(self.port)
        # one more sample shortly before the end (two reads in all, so the
        # sampling itself costs nothing measurable on the client CPU)
        if self._stop.wait(max(0.0, duration - 0.75 - (time.monotonic() - t0))):
            return
        self.last = client_ports(self.port)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def result(self) -> tuple[int, int]:
        """(connections seen at the start, how many of them were gone at the end)"""
        if not self.first or not self.last:
            return len(self.first), -1
        return len(self.first), len(self.first - self.last)


def cpus_busy(cpus: list[int], seconds: float = 1.0) -> dict[int, float]:
    """Non-idle % of each CPU over a short sample."""
    def snap():
        return {c: cpu_line(c) for c in cpus}
    a = snap()
    time.sleep(seconds)
    b = snap()
    out = {}
    for c in cpus:
        d = {k: b[c][k] - a[c][k] for k in a[c]}
        tot = sum(d.values()) or 1
        out[c] = (tot - d["idle"] - d["iowait"]) / tot * 100
    return out


def wait_quiet(args: argparse.Namespace) -> bool:
    """Before a measured run, wait (up to --quiet-wait s) until both benchmark
    CPUs are nearly idle, so other people's builds do not share CPU0 with us."""
    if args.quiet_wait <= 0:
        return True
    deadline = time.monotonic() + args.quiet_wait
    said = False
    while True:
        busy = cpus_busy([args.proxy_cpu, args.client_cpu])
        if max(busy.values()) <= args.quiet_threshold:
            return True
        if time.monotonic() > deadline:
            log(f"WARNING: machine still busy after {args.quiet_wait:g}s "
                f"({', '.join(f'CPU{c} {v:.0f}%' for c, v in busy.items())}); running anyway")
            return False
        if not said:
            log(f"waiting for the machine to go quiet ({', '.join(f'CPU{c} {v:.0f}%' for c, v in busy.items())} "
                f"busy; threshold {args.quiet_threshold:g}%, up to {args.quiet_wait:g}s)")
            said = True
        time.sleep(2)


# --------------------------------------------------------------------------
# Processes we start
# --------------------------------------------------------------------------

STARTED: list["Service"] = []


class Service:
    """A process tree we started; CPU is summed over the root and descendants."""

    def __init__(self, name: str, cmd: list[str], dirpath: Path, stop_signal=signal.SIGTERM,
                 env: dict[str, str] | None = None, unset_env_prefix: str | None = None):
        self.name, self.cmd, self.dir, self.stop_signal, self.env = name, cmd, dirpath, stop_signal, env
        self.unset_env_prefix = unset_env_prefix  # e.g. "ETCD_": such variables conflict with flags
        self.proc: subprocess.Popen | None = None
        self.known: dict[int, int] = {}  # pid -> starttime, to never signal a recycled pid
        self.logfile = dirpath / "stdout-stderr.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not (self.unset_env_prefix and k.startswith(self.unset_env_prefix))}
        env.update(self.env or {})
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                         cwd=self.dir, start_new_session=True, env=env)
        STARTED.append(self)
        (self.dir / "pid").write_text(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        pids = descendants(self.pid) if self.alive() else []
        for p in pids:
            st = proc_stat(p)
            if st:
                self.known.setdefault(p, st[3])
        return pids

    def cpu(self) -> dict[int, tuple[int, int]]:
        """{pid: (utime, stime)} in ticks for the whole tree."""
        out = {}
        for p in self.pids():
            st = proc_stat(p)
            if st and self.known.get(p) == st[3]:
                out[p] = (st[1], st[2])
        return out

    def describe_sched(self) -> list[dict]:
        out = []
        for p in self.pids():
            try:
                pol = os.sched_getscheduler(p)
                aff = sorted(os.sched_getaffinity(p))
                comm = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                continue
            polname = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_BATCH: "SCHED_BATCH",
                       os.SCHED_IDLE: "SCHED_IDLE", os.SCHED_FIFO: "SCHED_FIFO",
                       os.SCHED_RR: "SCHED_RR"}.get(pol, str(pol))
            out.append({"pid": p, "comm": comm, "policy": polname, "cpus": aff})
        return out

    def _ours(self, pid: int) -> bool:
        st = proc_stat(pid)
        return st is not None and self.known.get(pid) == st[3]

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.pids()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: did not exit after {timeout:.0f}s, sending SIGKILL to pid {self.pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # leftover children (e.g. nginx workers if the master was killed)
        for p in list(self.known):
            if p != self.pid and self._ours(p):
                time.sleep(0.5)
                if self._ours(p):
                    log(f"{self.name}: killing leftover pid {p}")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
        if self in STARTED:
            STARTED.remove(self)


def stop_all() -> None:
    for s in reversed(list(STARTED)):
        with contextlib.suppress(Exception):
            s.stop()


# --------------------------------------------------------------------------
# Context, backend and proxies
# --------------------------------------------------------------------------

@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    scenario: Scenario
    cert: Path
    key: Path
    pem: Path
    stub_status: bool
    body: str
    backend_ports: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # free space for scenario hooks
    # the scenario's fragments; prepare() may add to them (e.g. a port it chose)
    fragments: dict[str, str] = field(default_factory=dict)
    # processes a scenario started besides backend and proxies (e.g. etcd): their
    # CPU is reported per run and not counted as "foreign" load
    helpers: list["Service"] = field(default_factory=list)

    def __post_init__(self):
        self.fragments = dict(self.scenario.fragments)

    def frag(self, slot: str) -> str:
        return self.fragments.get(slot, "")

    def pin(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)]


class Backend:
    def __init__(self, ctx: Ctx, dirpath: Path | None = None):
        self.ctx = ctx
        self.dir = dirpath or ctx.workdir / "backend"
        self.dir.mkdir(parents=True)
        listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ctx.backend_ports)
        stub = ("        location = /__bench/status {\n            stub_status;\n        }"
                if ctx.stub_status else "")
        conf = render("backend-nginx.conf", {
            "DIR": self.dir, "BACKEND_LISTENS": listens, "BODY": ctx.body,
            "BODY_SIZE": len(ctx.body), "STUB_STATUS": stub,
            "BACKEND_SERVER": ctx.frag("BACKEND_SERVER")})
        (self.dir / "nginx.conf").write_text(conf)
        cmd = ctx.pin(ctx.args.proxy_cpu) + ["chrt", "-b", "0", "nginx", "-p", f"{self.dir}/",
                                             "-e", str(self.dir / "error.log"), "-c", str(self.dir / "nginx.conf")]
        self.svc = Service("backend", cmd, self.dir)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ctx.backend_ports[0]}{path}"

    def accepts(self) -> int | None:
        if not self.ctx.stub_status:
            return None
        status, _, body = http_get(self.url("/__bench/status"))
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", body)
        return int(m.group(1)) if status == 200 and m else None


class Proxy:
    name = "?"
    stop_signal = signal.SIGTERM

    def __init__(self, ctx: Ctx, ports: list[int]):
        self.ctx = ctx
        self.http_port, self.https_port = ports[0], ports[1]
        self.dir = ctx.workdir / self.name
        self.dir.mkdir(parents=True)
        self.svc = Service(self.name, self.command(), self.dir, self.stop_signal, self.env())

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def url(self, tls: bool, path: str = "/") -> str:
        return (f"https://127.0.0.1:{self.https_port}{path}" if tls
                else f"http://127.0.0.1:{self.http_port}{path}")

    def readiness_urls(self) -> list[str]:
        return [self.url(False), self.url(True)]


class NginxProxy(Proxy):
    name = "nginx"

    def command(self) -> list[str]:
        c = self.ctx
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in c.backend_ports)
        conf = render("proxy-nginx.conf", {
            "DIR": self.dir, "HTTP_PORT": self.http_port, "HTTPS_PORT": self.https_port,
            "CERT": c.cert, "KEY": c.key, "NGINX_UPSTREAM_SERVERS": servers,
            **{k: c.frag(k) for k in ("NGINX_MAIN", "NGINX_HTTP", "NGINX_UPSTREAM", "NGINX_LOCATION")}})
        (self.dir / "nginx.conf").write_text(conf)
        return c.pin(c.args.proxy_cpu) + ["nginx", "-p", f"{self.dir}/", "-e", str(self.dir / "error.log"),
                                          "-c", str(self.dir / "nginx.conf")]


class HaproxyProxy(Proxy):
    name = "haproxy"

    def command(self) -> list[str]:
        c = self.ctx
        servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(c.backend_ports))
        conf = render("proxy-haproxy.cfg", {
            "HTTP_PORT": self.http_port, "HTTPS_PORT": self.https_port, "PEM": c.pem,
            "HAPROXY_UPSTREAM_SERVERS": servers,
            **{k: c.frag(k) for k in ("HAPROXY_GLOBAL", "HAPROXY_DEFAULTS", "HAPROXY_FRONTEND",
                                      "HAPROXY_BACKEND")}})
        (self.dir / "haproxy.cfg").write_text(conf)
        return c.pin(c.args.proxy_cpu) + ["haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")]


class SpaceProxy(Proxy):
    name = "space"

    def __init__(self, ctx: Ctx, ports: list[int]):
        self.admin_port = ports[2]
        super().__init__(ctx, ports)

    def command(self) -> list[str]:
        c = self.ctx
        inst = "\n".join(f'[[module.instances]]\naddr = "127.0.0.1:{p}"\n' for p in c.backend_ports)
        conf = render("proxy-space.toml", {
            "HTTP_PORT": self.http_port, "HTTPS_PORT": self.https_port, "ADMIN_PORT": self.admin_port,
            "CERT_DIR": c.cert.parent, "SPACE_INSTANCES": inst,
            **{k: c.frag(k) for k in ("SPACE_SERVER", "SPACE_TOP", "SPACE_MODULE")}})
        (self.dir / "space.toml").write_text(conf)
        return c.pin(c.args.proxy_cpu) + [str(c.args.space_path), "run", "--config", str(self.dir / "space.toml")]

    def env(self) -> dict[str, str] | None:
        return dict(kv.split("=", 1) for kv in self.ctx.args.space_env)

    def readiness_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.admin_port}/readyz"] + super().readiness_urls()


PROXY_CLASSES = {"nginx": NginxProxy, "haproxy": HaproxyProxy, "space": SpaceProxy}
PROXY_PORTS = {"nginx": 2, "haproxy": 2, "space": 3}


def wait_ready(svc: Service, urls: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    last = ""
    while pending:
        if not svc.alive():
            raise BenchError(f"{svc.name} exited (code {svc.proc.returncode}) before becoming ready; "
                             f"command: {' '.join(svc.cmd)}\nlog {svc.logfile}:\n{tail(svc.logfile)}\n"
                             + (f"error.log:\n{tail(svc.dir / 'error.log')}" if (svc.dir / 'error.log').exists() else ""))
        try:
            status, _, _ = http_get(pending[0], timeout=1.0)
            if status == 200:
                pending.pop(0)
                continue
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise BenchError(f"{svc.name} not ready after {timeout:.0f}s: GET {pending[0]} -> {last}\n"
                             f"log {svc.logfile}:\n{tail(svc.logfile)}")
        time.sleep(0.1)


def tls_info(port: int) -> str:
    try:
        p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"],
                           input="", capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    out = p.stdout + p.stderr
    proto = re.search(r"Protocol version:\s*(\S+)", out)
    cipher = re.search(r"Ciphersuite:\s*(\S+)", out)
    return f"{proto.group(1)} {cipher.group(1)}" if proto and cipher else f"unknown: {out.strip()[:200]}"


def sanity(ctx: Ctx, proxy: Proxy) -> dict:
    """Checks the proxy forwards the body and sets X-Forwarded-For/Proto."""
    info: dict = {"warnings": []}
    for tls in (False, True):
        scheme = "https" if tls else "http"
        status, _, body = http_get(proxy.url(tls, ctx.scenario.path))
        if status != 200 or len(body) != len(ctx.body):
            raise BenchError(f"{proxy.name}: GET {proxy.url(tls, ctx.scenario.path)} -> {status}, "
                             f"{len(body)} bytes (want 200, {len(ctx.body)} bytes)")
        status, _, body = http_get(proxy.url(tls, "/__bench/echo"))
        echo = body.decode(errors="replace").strip()
        info[f"echo_{scheme}"] = echo
        fields = dict(kv.split("=", 1) for kv in echo.split(";") if "=" in kv)
        if "127.0.0.1" not in fields.get("xff", ""):
            info["warnings"].append(f"{scheme}: X-Forwarded-For not set by {proxy.name} ({echo})")
        if fields.get("xfp") != scheme:
            info["warnings"].append(f"{scheme}: X-Forwarded-Proto is {fields.get('xfp')!r}, want {scheme!r}")
    info["tls"] = tls_info(proxy.https_port)
    return info


# --------------------------------------------------------------------------
# Load runs
# --------------------------------------------------------------------------

def wrk(ctx: Ctx, proxy: Proxy, seconds: float, script: Path, label: str) -> tuple[dict, float]:
    a = ctx.args
    url = proxy.url(ctx.scenario.tls, ctx.scenario.path)
    cmd = ctx.pin(a.client_cpu) + ["wrk", "-t", str(a.threads), "-c", str(a.connections),
                                   "-d", f"{seconds:g}s", "--timeout", a.wrk_timeout, "--latency",
                                   "-s", str(script), *ctx.scenario.wrk_args, url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 30:.0f}s: {' '.join(cmd)}")
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = p.stdout + p.stderr
    (ctx.workdir / "wrk").mkdir(exist_ok=True)
    (ctx.workdir / "wrk" / f"{label}.txt").write_text(" ".join(cmd) + "\n\n" + out)
    m = re.search(r"^BENCH_RESULT (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise BenchError(f"wrk failed (exit {p.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    res = json.loads(m.group(1))
    wrk_cpu = ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall * 100
    return res, wrk_cpu


def cpu_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[int, int, bool]:
    """Sum of (utime, stime) ticks over the window; flag if a process vanished."""
    u = s = 0
    for pid, (ua, sa) in after.items():
        ub, sb = before.get(pid, (0, 0))
        u, s = u + ua - ub, s + sa - sb
    return u, s, bool(set(before) - set(after))


def us(ticks: float) -> float:
    return ticks * 1e6 / CLK_TCK


def measured_run(ctx: Ctx, proxy: Proxy, backend: Backend, script: Path, rnd: int,
                 helpers: list[Service] | None = None) -> dict:
    a = ctx.args
    helpers = helpers if helpers is not None else ctx.helpers
    hook = ctx.scenario.during(ctx, proxy.name) if ctx.scenario.during else contextlib.nullcontext()
    with hook as hook_info:
        acc0 = backend.accepts()
        c0, k0 = cpu_line(a.proxy_cpu), cpu_line(a.client_cpu)
        p0, b0 = proxy.svc.cpu(), backend.svc.cpu()
        h0 = [h.cpu() for h in helpers]
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        with ConnWatch(proxy.https_port if ctx.scenario.tls else proxy.http_port, a.duration) as watch:
            res, wrk_cpu = wrk(ctx, proxy, a.duration, script, f"{ctx.scenario.name}-{proxy.name}-r{rnd}")
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        h1 = [h.cpu() for h in helpers]
        p1, b1 = proxy.svc.cpu(), backend.svc.cpu()
        c1, k1 = cpu_line(a.proxy_cpu), cpu_line(a.client_cpu)
        acc1 = backend.accepts()
    conns_seen, conns_replaced = watch.result()
    if not proxy.svc.alive():
        raise BenchError(f"{proxy.name} died during the run\n{tail(proxy.svc.logfile)}")
    n = res["requests"]
    if n <= 0:
        raise BenchError(f"{proxy.name}: wrk completed no requests (see {ctx.workdir / 'wrk'})")
    pu, ps, pgone = cpu_delta(p0, p1)
    bu, bs, bgone = cpu_delta(b0, b1)
    cd = {k: c1[k] - c0[k] for k in c0}
    total = sum(cd.values()) or 1
    busy = total - cd["idle"] - cd["iowait"] - cd["steal"]
    foreign = busy - (pu + ps + bu + bs)
    kd = {k: k1[k] - k0[k] for k in k0}
    ktotal = sum(kd.values()) or 1
    client_busy_pct = (ktotal - kd["idle"] - kd["iowait"] - kd["steal"]) / ktotal * 100
    # helper processes (e.g. etcd, pinned to the client CPU) and the harness itself
    # (its /proc sampling, a churn thread): known load, not a noisy neighbour
    helper_ticks = sum(sum(cpu_delta(x, y)[:2]) for x, y in zip(h0, h1))
    helpers_pct = helper_ticks / ktotal * 100
    harness_pct = ((self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)) * CLK_TCK / ktotal * 100
    upstream = (acc1 - acc0 - 1) if acc0 is not None and acc1 is not None else None  # -1: the 2nd status GET
    errors = {k[4:]: res[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")}
    run = {
        "proxy": proxy.name, "round": rnd,
        "requests": n, "duration_s": res["duration_us"] / 1e6,
        "rps": n / (res["duration_us"] / 1e6),
        "p50_ms": res["p50_us"] / 1000, "p90_ms": res["p90_us"] / 1000,
        "p99_ms": res["p99_us"] / 1000, "p999_ms": res["p999_us"] / 1000,
        "lat_mean_ms": res["lat_mean_us"] / 1000, "lat_max_ms": res["lat_max_us"] / 1000,
        "bytes_per_req": res["bytes"] / n,
        "proxy_us_per_req": us(pu + ps) / n, "proxy_user_us_per_req": us(pu) / n,
        "proxy_sys_us_per_req": us(ps) / n,
        "backend_us_per_req": us(bu + bs) / n, "backend_user_us_per_req": us(bu) / n,
        "backend_sys_us_per_req": us(bs) / n,
        "upstream_conns": upstream,
        "client_conns_seen": conns_seen, "client_conns_replaced": conns_replaced,
        "errors": errors, "errors_total": sum(errors.values()),
        "wrk_cpu_pct": wrk_cpu,
        "proxy_cpu_busy_pct": busy / total * 100,
        "proxy_cpu_foreign_pct": foreign / total * 100,
        "proxy_cpu_steal_pct": cd["steal"] / total * 100,
        "proxy_cpu_softirq_pct": cd["softirq"] / total * 100,
        "client_cpu_busy_pct": client_busy_pct,
        "helpers_cpu_pct": helpers_pct if helpers else None,
        "harness_cpu_pct": harness_pct,
        # CPU of the client CPU not used by wrk, the scenario's helpers or the harness
        # (i.e. other processes)
        "client_cpu_foreign_pct": max(0.0, client_busy_pct - wrk_cpu - helpers_pct - harness_pct),
        "warnings": [],
    }
    w = run["warnings"]
    if isinstance(hook_info, dict):
        run["scenario_info"] = {k: v for k, v in hook_info.items() if k != "warnings"}
        w.extend(hook_info.get("warnings", []))
    if run["errors_total"]:
        w.append(f"wrk errors {errors}")
    if conns_replaced != 0 or conns_seen != a.connections:
        w.append(f"client keep-alive: {conns_seen} wrk connections seen after 1 s (want {a.connections}), "
                 f"{conns_replaced} of them gone before the end (-1 = not sampled)")
    if pgone or bgone:
        w.append("a proxy/backend process exited during the run; CPU undercounted")
    if run["proxy_cpu_foreign_pct"] > a.max_foreign:
        w.append(f"{run['proxy_cpu_foreign_pct']:.1f}% of CPU{a.proxy_cpu} went to other processes/irq "
                 f"(noisy neighbour?)")
    if run["client_cpu_foreign_pct"] > a.max_foreign:
        w.append(f"{run['client_cpu_foreign_pct']:.1f}% of CPU{a.client_cpu} (wrk's) went to other processes")
    if run["proxy_cpu_steal_pct"] > 2:
        w.append(f"steal {run['proxy_cpu_steal_pct']:.1f}% on CPU{a.proxy_cpu}")
    if wrk_cpu > 90 * a.threads:
        w.append(f"wrk used {wrk_cpu:.0f}% CPU: the client may be the bottleneck")
    if run["proxy_cpu_busy_pct"] < 90:
        w.append(f"CPU{a.proxy_cpu} only {run['proxy_cpu_busy_pct']:.0f}% busy: proxy CPU not saturated")
    if abs(run["bytes_per_req"] - ctx.extra["bytes_per_req_ref"]) > 64 and ctx.scenario.path == "/":
        w.append(f"{run['bytes_per_req']:.0f} bytes/response vs {ctx.extra['bytes_per_req_ref']:.0f} direct")
    if ctx.scenario.check_run:
        w.extend(ctx.scenario.check_run(ctx, run))
    return run


def summarize(runs: list[dict]) -> dict:
    def med(k):
        vals = [r[k] for r in runs if r.get(k) is not None]
        return statistics.median(vals) if vals else None
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "proxy_us_per_req", "proxy_user_us_per_req",
            "proxy_sys_us_per_req", "backend_us_per_req", "upstream_conns", "client_conns_replaced", "wrk_cpu_pct",
            "proxy_cpu_busy_pct", "proxy_cpu_foreign_pct", "client_cpu_foreign_pct", "helpers_cpu_pct",
            "harness_cpu_pct")
    s = {k: med(k) for k in keys}
    s["proxy_us_per_req_min"] = min(r["proxy_us_per_req"] for r in runs)
    s["proxy_us_per_req_max"] = max(r["proxy_us_per_req"] for r in runs)
    s["requests_total"] = sum(r["requests"] for r in runs)
    s["errors_total"] = sum(r["errors_total"] for r in runs)
    s["errors"] = {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]}
    s["rounds"] = len(runs)
    return s


# --------------------------------------------------------------------------
# One scenario end to end
# --------------------------------------------------------------------------

def make_cert(workdir: Path) -> tuple[Path, Path, Path]:
    d = workdir / "space-certs"
    d.mkdir()
    crt, key = d / "bench.crt", d / "bench.key"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "7", "-subj", "/CN=localhost",
           "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise BenchError(f"openssl failed: {p.stderr}")
    pem = workdir / "haproxy-bench.pem"  # HAProxy wants cert + key in one file
    pem.write_text(crt.read_text() + key.read_text())
    os.chmod(key, 0o600)
    os.chmod(pem, 0o600)
    return crt, key, pem


def make_body(size: int) -> str:
    pattern = "SPACE-bench-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ."
    if size < 2:
        return "x" * size
    return (pattern * (size // len(pattern) + 1))[: size - 1] + "\n"


def run_group(args: argparse.Namespace, scens: list[Scenario], base: Path, proxies: list[str],
              stub_status: bool) -> list[dict]:
    """Runs one scenario end to end, or several scenarios of one group interleaved
    (one backend, all their proxies up at once, runs alternating). Returns one
    report per scenario."""
    first = scens[0]
    for sc in scens[1:]:
        for attr in ("backend_instances", "tls", "path"):
            if getattr(sc, attr) != getattr(first, attr):
                raise BenchError(f"scenarios {first.name} and {sc.name} differ in {attr}: cannot interleave")
        if sc.fragments.get("BACKEND_SERVER", "") != first.fragments.get("BACKEND_SERVER", ""):
            raise BenchError(f"scenarios {first.name} and {sc.name} need different backends: cannot interleave")
    grouped = len(scens) > 1
    gdir = base / "+".join(sc.name for sc in scens)
    gdir.mkdir()
    crt, key, pem = make_cert(gdir)
    body = make_body(args.body_size)
    applicable = {sc.name: sc.applicable(proxies) for sc in scens}
    nports = first.backend_instances + sum(PROXY_PORTS[p] for sc in scens for p in applicable[sc.name])
    ports = free_ports(nports)
    backend_ports, ports = ports[:first.backend_instances], ports[first.backend_instances:]
    ctxs: list[Ctx] = []
    for sc in scens:
        wd = gdir / sc.name if grouped else gdir
        wd.mkdir(exist_ok=True)
        ctx = Ctx(args, wd, sc, crt, key, pem, stub_status, body)
        ctx.backend_ports = backend_ports
        ctxs.append(ctx)
    prepared: list[Ctx] = []
    try:
        for ctx in ctxs:
            prepared.append(ctx)  # cleanup also runs if prepare fails halfway
            if ctx.scenario.prepare:
                ctx.scenario.prepare(ctx)
        helpers = [h for c in ctxs for h in c.helpers]
        backend = Backend(ctxs[0], gdir / "backend")
        backend.svc.start()
        wait_ready(backend.svc, [backend.url(first.path)], args.ready_timeout)
        _, _, ref = http_get(backend.url(first.path))
        # units of alternation: (scenario context, proxy name, proxy), proxy-major
        units: list[tuple[Ctx, str, Proxy]] = []
        for name in proxies:
            for ctx in ctxs:
                if name not in applicable[ctx.scenario.name]:
                    continue
                k = PROXY_PORTS[name]
                px = PROXY_CLASSES[name](ctx, ports[:k])
                ports = ports[k:]
                units.append((ctx, name, px))
                ctx.extra.setdefault("proxies", {})[name] = px
                log(f"[{ctx.scenario.name}] starting {name}: {' '.join(px.svc.cmd)}")
                px.svc.start()
        for _, _, px in units:
            wait_ready(px.svc, px.readiness_urls(), args.ready_timeout)
        reports: dict[str, dict] = {}
        for ctx in ctxs:
            sc = ctx.scenario
            # Reference response size through no proxy: headers differ per proxy, so
            # compare wrk's bytes/response against the direct one loosely.
            ctx.extra["bytes_per_req_ref"] = len(ref) + 150
            reports[sc.name] = {
                "name": sc.name, "description": sc.description, "tls": sc.tls, "path": sc.path,
                "backend_ports": ctx.backend_ports, "applicable": applicable[sc.name],
                "group": sc.group if grouped else None,
                "scenario_proxies": list(sc.proxies) if sc.proxies else None,
                "interleaved_with": [x.name for x in scens if x is not sc],
                "proxies": {}, "runs": [], "discarded": [], "warnings": [],
                "backend_sched": backend.svc.describe_sched()}
        for ctx, name, px in units:
            sc, rep = ctx.scenario, reports[ctx.scenario.name]
            info = sanity(ctx, px)
            info["sched"] = px.svc.describe_sched()
            info["command"] = px.svc.cmd
            rep["proxies"][name] = info
            bad = [d for d in info["sched"] if d["cpus"] != [args.proxy_cpu]]
            if bad:
                raise BenchError(f"{name} not pinned to CPU{args.proxy_cpu}: {bad}")
            if sc.ready:
                chk = sc.ready(ctx, px) or {}
                info["scenario_check"] = {k: v for k, v in chk.items() if k != "warnings"}
                info["warnings"].extend(chk.get("warnings", []))
            for w in info["warnings"]:
                rep["warnings"].append(f"{name}: {w}")
                log(f"[{sc.name}] WARNING {name}: {w}")
            log(f"[{sc.name}] {name} ready; TLS {info['tls']}; pids "
                f"{[d['pid'] for d in info['sched']]}")
        bad = [d for d in backend.svc.describe_sched()
               if d["policy"] != "SCHED_BATCH" or d["cpus"] != [args.proxy_cpu]]
        if bad:
            raise BenchError(f"backend not SCHED_BATCH on CPU{args.proxy_cpu}: {bad}")
        if args.check_only:
            log(f"[{'+'.join(reports)}] --check-only: everything started and answered; no load run")
            return list(reports.values())

        for ctx in ctxs:
            script = ctx.workdir / "wrk.lua"
            script.write_text(ctx.scenario.lua_text(ctx) + "\n" + (TEMPLATES / "wrk-report.lua").read_text())
            ctx.extra["script"] = script
        # Bytes per response through each proxy, from a short warm-up.
        for ctx, name, px in units:
            sc, rep = ctx.scenario, reports[ctx.scenario.name]
            log(f"[{sc.name}] warm-up {name} {args.warmup:g}s")
            res, _ = wrk(ctx, px, args.warmup, ctx.extra["script"], f"{sc.name}-{name}-warmup")
            errs = sum(res[k] for k in res if k.startswith("err_"))
            if errs:
                rep["warnings"].append(f"{name}: {errs} wrk errors during warm-up")
                log(f"[{sc.name}] WARNING {name}: {errs} wrk errors during warm-up")
            rep["proxies"][name]["warmup_bytes_per_req"] = res["bytes"] / max(res["requests"], 1)
        for rnd in range(1, args.rounds + 1):
            order = units
            if grouped and rnd % 2 == 0:
                # A B, B A, A B ...: a linear drift then favours neither scenario
                order = [u for name in proxies for u in reversed([u for u in units if u[1] == name])]
            for ctx, name, px in order:
                sc, rep = ctx.scenario, reports[ctx.scenario.name]
                ctx.extra["bytes_per_req_ref"] = rep["proxies"][name]["warmup_bytes_per_req"]
                attempts = []
                for attempt in range(args.retries + 1):
                    quiet = wait_quiet(args)
                    r = measured_run(ctx, px, backend, ctx.extra["script"], rnd, helpers)
                    if not quiet:
                        r["warnings"].append("started while the machine was busy")
                    r["noise_pct"] = max(r["proxy_cpu_foreign_pct"], r["client_cpu_foreign_pct"])
                    attempts.append(r)
                    if r["noise_pct"] <= args.max_foreign:
                        break
                    log(f"[{sc.name}] round {rnd} {name}: noisy (other processes took "
                        f"{r['proxy_cpu_foreign_pct']:.1f}% of CPU{args.proxy_cpu}, "
                        f"{r['client_cpu_foreign_pct']:.1f}% of CPU{args.client_cpu})"
                        + ("; retrying" if attempt < args.retries else "; keeping the least noisy attempt"))
                r = min(attempts, key=lambda x: x["noise_pct"])
                rep["discarded"].extend(x for x in attempts if x is not r)
                rep["runs"].append(r)
                log(f"[{sc.name}] round {rnd} {name:8s} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                    f"p99 {r['p99_ms']:.3f} ms  proxy {r['proxy_us_per_req']:.2f} us/req  "
                    f"backend {r['backend_us_per_req']:.2f} us/req  errors {r['errors_total']}"
                    + (f"  [{r['scenario_info']['log']}]" if r.get("scenario_info", {}).get("log") else ""))
                for w in r["warnings"]:
                    rep["warnings"].append(f"round {rnd} {name}: {w}")
                    log(f"[{sc.name}] WARNING round {rnd} {name}: {w}")
        for rep in reports.values():
            names = [n for n in proxies if n in rep["applicable"]]
            rep["summary"] = {n: summarize([r for r in rep["runs"] if r["proxy"] == n]) for n in names}
            ref_us = rep["summary"].get("nginx", {}).get("proxy_us_per_req")
            for n, s in rep["summary"].items():
                s["proxy_us_ratio_vs_nginx"] = (s["proxy_us_per_req"] / ref_us) if ref_us else None
        return list(reports.values())
    finally:
        for s in reversed(list(STARTED)):
            s.stop()
        for ctx in reversed(prepared):
            if ctx.scenario.cleanup:
                try:
                    ctx.scenario.cleanup(ctx)
                except Exception as e:  # noqa: BLE001 - report, do not mask the original error
                    log(f"[{ctx.scenario.name}] cleanup failed: {e!r}")


# --------------------------------------------------------------------------
# etcd (for the churn scenarios and propagation.py)
# --------------------------------------------------------------------------

def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def b64_prefix_end(prefix: str) -> str:
    """etcd range_end for "every key starting with prefix"."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


class EtcdClient:
    """etcd's v3 JSON gateway (POST /v3/kv/...) over one keep-alive connection
    (reconnects once on a dropped connection)."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            if resp.status != 200:
                raise BenchError(f"etcd {path} {body} -> HTTP {resp.status}: {raw[:300]!r}")
            return json.loads(raw)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @staticmethod
    def op_put(key: str, value: str) -> dict:
        return {"request_put": {"key": b64(key), "value": b64(value)}}

    @staticmethod
    def op_delete(key: str, prefix: bool = False) -> dict:
        d = {"key": b64(key)}
        if prefix:
            d["range_end"] = b64_prefix_end(key)
        return {"request_delete_range": d}

    def put(self, key: str, value: str) -> dict:
        return self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key: str, prefix: bool = False) -> dict:
        return self.call("/v3/kv/deleterange", self.op_delete(key, prefix)["request_delete_range"])

    def txn(self, ops: list[dict]) -> dict:
        """All ops in one transaction: one etcd revision, one watch response."""
        reply = self.call("/v3/kv/txn", {"compare": [], "success": ops, "failure": []})
        if not reply.get("succeeded", False):
            raise BenchError(f"etcd txn did not succeed: {reply}")
        return reply

    def revision(self) -> int:
        reply = self.call("/v3/kv/range", {"key": b64("/"), "count_only": True})
        return int(reply["header"]["revision"])


class EtcdServer:
    """A single-member etcd on free 127.0.0.1 ports with a data dir under workdir."""

    def __init__(self, workdir: Path, cpu: int | None = None, binary: str = "etcd"):
        self.dir, self.cpu, self.binary = workdir / "etcd", cpu, binary
        self.svc: Service | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        last = ""
        for attempt in range(3):  # another process may grab a "free" port meanwhile
            self.port, peer = free_ports(2)
            cu, pu = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
            data = self.dir / f"data{attempt}"
            cmd = (["taskset", "-c", str(self.cpu)] if self.cpu is not None else []) + [
                self.binary, "--name", "default", "--data-dir", str(data),
                "--listen-client-urls", cu, "--advertise-client-urls", cu,
                "--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
                "--initial-cluster", f"default={pu}", "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]
            svc = Service("etcd", cmd, self.dir, unset_env_prefix="ETCD_")
            svc.start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and svc.alive():
                try:
                    status, _, body = http_get(f"{cu}/health", timeout=1.0)
                    if status == 200 and json.loads(body).get("health") == "true":
                        self.svc = svc
                        return
                    last = f"HTTP {status} {body[:100]!r}"
                except (OSError, ValueError, http.client.HTTPException) as e:
                    last = repr(e)
                time.sleep(0.1)
            svc.stop()
            last = f"{last}; log:\n{tail(svc.logfile, 15)}"
        raise BenchError(f"etcd did not become healthy: {' '.join(cmd)}\n{last}")

    def stop(self) -> None:
        if self.svc:
            self.svc.stop()


def space_admin_json(ctx: "Ctx", proxy: "Proxy", path: str) -> dict:
    status, _, body = http_get(f"http://127.0.0.1:{proxy.admin_port}{path}")
    if status != 200:
        raise BenchError(f"space admin {path} -> HTTP {status}")
    return json.loads(body)


def space_metrics(proxy: "Proxy") -> str:
    status, _, body = http_get(f"http://127.0.0.1:{proxy.admin_port}/metrics")
    return body.decode(errors="replace") if status == 200 else ""


# --------------------------------------------------------------------------
# Scenario hooks: affinity
# --------------------------------------------------------------------------
#
# Both affinity scenarios send `Cookie: PHPSESSID=<session i>; space-bench=<token i>`
# for --sessions distinct sessions, so the request bytes are the same and only
# SPACE's affinity work differs. affinity-on learns each session's routing token
# from SPACE first (one request per session with only PHPSESSID: SPACE places it by
# the PHPSESSID hash and sets the cookie); affinity-off sends a made-up token of the
# same shape (22 base64url characters), which SPACE without affinity ignores.

AFFINITY_COOKIE = "space-bench"
PORT_HEADER = "x-bench-port"  # set by the backend for the affinity scenarios


def session_id(i: int) -> str:
    return hashlib.sha256(f"space-bench-session-{i}".encode()).hexdigest()[:26]


def fake_token(i: int) -> str:
    raw = hashlib.sha256(f"space-bench-token-{i}".encode()).digest()[:16]
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def cookie_header(sid: str, token: str) -> str:
    return f"PHPSESSID={sid}; {AFFINITY_COOKIE}={token}"


def affinity_prepare(ctx: "Ctx") -> None:
    # a fixed key file (as in production), so the tokens do not depend on the process
    keyf = ctx.workdir / "affinity.key"
    keyf.write_text(secrets.token_hex(32) + "\n")
    os.chmod(keyf, 0o644)
    ctx.fragments["SPACE_TOP"] = ctx.fragments.get("SPACE_TOP", "") + f'\n[affinity]\nkey_file = "{keyf}"\n'


def _keepalive_get(conn: http.client.HTTPConnection, path: str, headers: dict) -> tuple[int, dict, bytes]:
    conn.request("GET", path, headers={"User-Agent": "space-bench", **headers})
    resp = conn.getresponse()
    body = resp.read()
    hdrs: dict = {}
    for k, v in resp.getheaders():
        hdrs.setdefault(k.lower(), []).append(v)
    return resp.status, hdrs, body


def _routing_cookie(hdrs: dict) -> str | None:
    for v in hdrs.get("set-cookie", []):
        m = re.match(rf"\s*{re.escape(AFFINITY_COOKIE)}=([A-Za-z0-9_-]+)", v)
        if m:
            return m.group(1)
    return None


def write_sessions_lua(ctx: "Ctx", pairs: list[tuple[str, str]]) -> Path:
    path = ctx.workdir / "sessions.lua"
    path.write_text("-- (PHPSESSID, space-bench token) per session, generated by bench.py\nreturn {\n"
                    + "".join(f'{{"{s}","{t}"}},\n' for s, t in pairs) + "}\n")
    ctx.extra["sessions_lua"] = path
    return path


def affinity_lua(ctx: "Ctx") -> str:
    """Cycles through the sessions; every request carries both cookies. The request
    strings are built once in init(), so request() costs wrk little."""
    path = ctx.extra.get("sessions_lua")
    if path is None:  # the scenario's proxies did not run ready(): nothing learned
        path = write_sessions_lua(ctx, [(session_id(i), fake_token(i)) for i in range(ctx.args.sessions)])
    return f"""
local sessions = dofile("{path}")
local reqs = {{}}
local n = 0
local i = 0
init = function(args)
  for k, s in ipairs(sessions) do
    reqs[k] = wrk.format(nil, nil, {{["Cookie"] = "PHPSESSID=" .. s[1] .. "; {AFFINITY_COOKIE}=" .. s[2]}})
  end
  n = #reqs
  i = math.random(n) - 1
end
request = function()
  i = i % n + 1
  return reqs[i]
end
"""


def affinity_ready(ctx: "Ctx", proxy: "Proxy") -> dict:
    """affinity-on: learn every session's token and check that a learned token pins.
    affinity-off: check that SPACE really ignores the cookies (requests spread)."""
    on = "affinity" in ctx.frag("SPACE_MODULE")
    n = ctx.args.sessions
    sessions = [session_id(i) for i in range(n)]
    path = ctx.scenario.path
    conn = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=5)
    info: dict = {"affinity": on, "sessions": n, "warnings": []}
    try:
        if not on:
            pairs = [(s, fake_token(i)) for i, s in enumerate(sessions)]
            seen_ports = set()
            for sid, tok in pairs[:: max(1, n // 10)][:10]:
                for _ in range(4):
                    st, h, body = _keepalive_get(conn, path, {"Cookie": cookie_header(sid, tok)})
                    if st != 200 or len(body) != len(ctx.body):
                        raise BenchError(f"{proxy.name}: GET {path} with cookies -> {st}, {len(body)} bytes")
                    if _routing_cookie(h):
                        raise BenchError(f"{proxy.name}: affinity-off, yet a {AFFINITY_COOKIE} cookie was set")
                    seen_ports.update(h.get(PORT_HEADER, []))
            info["backend_ports_seen"] = sorted(seen_ports)
            if len(seen_ports) < min(2, ctx.scenario.backend_instances):
                info["warnings"].append(f"affinity-off: 40 requests all went to backend ports {sorted(seen_ports)}; "
                                        "expected them spread by round robin")
            write_sessions_lua(ctx, pairs)
            return info

        t0 = time.monotonic()
        pairs, token_ports = [], {}
        for sid in sessions:
            st, h, _ = _keepalive_get(conn, path, {"Cookie": f"PHPSESSID={sid}"})
            tok = _routing_cookie(h)
            if st != 200 or not tok or len(tok) != 22:
                raise BenchError(f"{proxy.name}: learning tokens: GET {path} with PHPSESSID={sid} -> {st}, "
                                 f"Set-Cookie {h.get('set-cookie')} (want 200 and {AFFINITY_COOKIE}=<22 chars>)")
            pairs.append((sid, tok))
            token_ports.setdefault(tok, set()).update(h.get(PORT_HEADER, []))
        info["learn_seconds"] = round(time.monotonic() - t0, 3)
        bad = {t: sorted(p) for t, p in token_ports.items() if len(p) != 1}
        if bad:
            raise BenchError(f"{proxy.name}: one routing token was answered by several backend ports: {bad}")
        port_of = {t: next(iter(p)) for t, p in token_ports.items()}
        dist: dict[str, int] = {}
        for _, tok in pairs:
            dist[port_of[tok]] = dist.get(port_of[tok], 0) + 1
        info["sessions_per_backend_port"] = dict(sorted(dist.items()))
        info["distinct_tokens"] = len(token_ports)
        if len(dist) < ctx.scenario.backend_instances:
            info["warnings"].append(f"sessions landed on only {len(dist)} of {ctx.scenario.backend_instances} "
                                    f"instances: {dist}")
        # A learned token must pin: same backend port every time, and no new cookie.
        checked = 0
        for sid, tok in pairs[:: max(1, n // 50)]:
            for _ in range(4):
                st, h, body = _keepalive_get(conn, path, {"Cookie": cookie_header(sid, tok)})
                port = h.get(PORT_HEADER, ["?"])[0]
                if st != 200 or len(body) != len(ctx.body):
                    raise BenchError(f"{proxy.name}: GET {path} with learned cookies -> {st}, {len(body)} bytes")
                if port != port_of[tok]:
                    raise BenchError(f"{proxy.name}: affinity lost: session {sid} with token {tok} went to "
                                     f"backend port {port}, not {port_of[tok]} (where the token was issued)")
                if _routing_cookie(h):
                    raise BenchError(f"{proxy.name}: a valid routing cookie was answered with a new Set-Cookie "
                                     f"{h.get('set-cookie')}")
                checked += 1
        info["pin_checks"] = checked
        write_sessions_lua(ctx, pairs)
        log(f"[{ctx.scenario.name}] learned {n} routing tokens in {info['learn_seconds']:.2f}s "
            f"({len(token_ports)} distinct, sessions per backend port {info['sessions_per_backend_port']}); "
            f"{checked} requests with learned tokens all stayed on their port")
        return info
    finally:
        conn.close()


AFF_METRIC = re.compile(r'^space_affinity_total\{module="bench",outcome="(\w+)"\} (\d+)', re.M)


@contextlib.contextmanager
def affinity_during(ctx: "Ctx", proxy_name: str):
    """affinity-on: SPACE's affinity counters over the run (every request must follow
    its cookie: outcome "kept")."""
    info: dict = {"warnings": []}
    px = ctx.extra.get("proxies", {}).get(proxy_name)
    if proxy_name != "space" or px is None:
        yield info
        return
    before = {k: int(v) for k, v in AFF_METRIC.findall(space_metrics(px))}
    yield info
    after = {k: int(v) for k, v in AFF_METRIC.findall(space_metrics(px))}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    info["affinity_outcomes"] = delta
    other = {k: v for k, v in delta.items() if k != "kept" and v}
    if other:
        info["warnings"].append(f"affinity: requests not following their routing cookie during the run: {other}")
    info["log"] = f"affinity kept {delta.get('kept', 0)}" + (f", other {other}" if other else "")


def affinity_check_run(ctx: "Ctx", run: dict) -> list[str]:
    kept = run.get("scenario_info", {}).get("affinity_outcomes", {}).get("kept")
    if kept is None:
        return []
    # kept also counts requests still in flight when wrk stopped (<= connections)
    if kept < run["requests"]:
        return [f"affinity: only {kept} of {run['requests']} requests followed their routing cookie"]
    return []


# --------------------------------------------------------------------------
# Scenario hooks: etcd churn
# --------------------------------------------------------------------------
#
# Both churn scenarios run a real etcd (pinned to the client CPU, so it does not
# share the proxy CPU) and give SPACE [discovery.etcd]. wrk loads "/", served by the
# file-configured module throughout. churn-on changes one route every
# --churn-interval (100 ms) during each measured run: alternately it adds a module
# /churn-<k> (manifest + one instance, the backend, in one etcd transaction) and
# deletes the oldest one (module key + its instances, one transaction), so 1-2
# churn modules exist at any time. The churn modules strip their prefix, so
# /churn-<k>/__bench/echo reaches the backend's echo page only while /churn-<k> is
# routed (the "/" module would answer the 1 KiB body instead).

ETCD_PREFIX = "/space/"


def churn_manifest(k: int) -> str:
    return json.dumps({"name": f"churn-{k}", "prefixes": [f"/churn-{k}"], "strip_prefix": True,
                       "health_check": {"enabled": False}})


def churn_put_ops(ctx: "Ctx", k: int) -> list[dict]:
    inst = json.dumps({"addr": f"127.0.0.1:{ctx.backend_ports[0]}", "weight": 1})
    return [EtcdClient.op_put(f"{ETCD_PREFIX}modules/churn-{k}", churn_manifest(k)),
            EtcdClient.op_put(f"{ETCD_PREFIX}instances/churn-{k}/i1", inst)]


def churn_delete_ops(k: int) -> list[dict]:
    return [EtcdClient.op_delete(f"{ETCD_PREFIX}modules/churn-{k}"),
            EtcdClient.op_delete(f"{ETCD_PREFIX}instances/churn-{k}/", prefix=True)]


def churn_prepare(ctx: "Ctx") -> None:
    etcd = EtcdServer(ctx.workdir, cpu=ctx.args.client_cpu, binary=ctx.args.etcd)
    ctx.extra["etcd"] = etcd
    etcd.start()
    ctx.helpers.append(etcd.svc)
    log(f"[{ctx.scenario.name}] etcd ready at {etcd.endpoint} (pid {etcd.svc.pid}, pinned to CPU{ctx.args.client_cpu})")
    ctx.fragments["SPACE_TOP"] = ctx.fragments.get("SPACE_TOP", "") + (
        f'\n[discovery.etcd]\nendpoints = ["{etcd.endpoint}"]\nprefix = "{ETCD_PREFIX}"\ndebounce = "5ms"\n')
    client = EtcdClient(etcd.port)
    client.txn(churn_put_ops(ctx, 0))  # one churn module from the start, in both scenarios
    ctx.extra["etcd_client"] = client
    ctx.extra["churn_live"] = [0]
    ctx.extra["churn_next"] = 1


def churn_cleanup(ctx: "Ctx") -> None:
    if ctx.extra.get("etcd_client"):
        ctx.extra["etcd_client"].close()
    if ctx.extra.get("etcd"):
        ctx.extra["etcd"].stop()


def routed_to_churn(proxy: "Proxy", k: int, conn: http.client.HTTPConnection | None = None) -> bool:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=3)
    try:
        st, _, body = _keepalive_get(conn, f"/churn-{k}/__bench/echo", {})
        return st == 200 and body.startswith(b"xff=")
    finally:
        if own:
            conn.close()


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.005) -> float | None:
    """Seconds until pred() held, or None after timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


def churn_ready(ctx: "Ctx", proxy: "Proxy") -> dict:
    """SPACE is connected to etcd, routes the seeded churn module, and applies a
    live change (add, then delete) within a second or two."""
    info: dict = {"warnings": []}
    if proxy.name != "space":
        return info
    disc = space_admin_json(ctx, proxy, "/api/discovery")
    if not (disc.get("etcd") or {}).get("connected"):
        raise BenchError(f"space is not connected to etcd: /api/discovery {disc}")
    if wait_until(lambda: routed_to_churn(proxy, 0), 5) is None:
        raise BenchError("space does not route /churn-0 (seeded in etcd before it started)")
    client: EtcdClient = ctx.extra["etcd_client"]
    client.txn(churn_put_ops(ctx, 999999))
    t_add = wait_until(lambda: routed_to_churn(proxy, 999999), 3)
    client.txn(churn_delete_ops(999999))
    t_del = wait_until(lambda: not routed_to_churn(proxy, 999999), 3)
    if t_add is None or t_del is None:
        raise BenchError(f"space did not apply an etcd change within 3 s (add {t_add}, delete {t_del})")
    info.update(etcd_revision=client.revision(), probe_add_ms=round(t_add * 1000, 1),
                probe_delete_ms=round(t_del * 1000, 1))
    log(f"[{ctx.scenario.name}] etcd discovery works: a new module was routed after {t_add * 1000:.0f} ms, "
        f"gone after {t_del * 1000:.0f} ms")
    return info


class Churner(threading.Thread):
    """One route change every `interval` seconds on an absolute schedule."""

    def __init__(self, ctx: "Ctx", interval: float):
        super().__init__(daemon=True, name="churn")
        self.ctx, self.interval = ctx, interval
        self.stop_event = threading.Event()
        self.client = EtcdClient(ctx.extra["etcd"].port)
        self.puts = self.deletes = self.late = 0
        self.failures: list[str] = []
        self.call_ms: list[float] = []
        self.last_deleted: int | None = None

    def run(self) -> None:
        live, t0, i = self.ctx.extra["churn_live"], time.monotonic(), 0
        while True:
            delay = t0 + i * self.interval - time.monotonic()
            if delay < -self.interval:
                self.late += 1
            if self.stop_event.wait(max(0.0, delay)):
                break
            try:
                t = time.monotonic()
                if i % 2 == 0 or not live:
                    k = self.ctx.extra["churn_next"]
                    self.client.txn(churn_put_ops(self.ctx, k))
                    live.append(k)
                    self.ctx.extra["churn_next"] = k + 1
                    self.puts += 1
                else:
                    k = live.pop(0)
                    self.client.txn(churn_delete_ops(k))
                    self.last_deleted = k
                    self.deletes += 1
                self.call_ms.append((time.monotonic() - t) * 1000)
            except (OSError, http.client.HTTPException, BenchError, ValueError) as e:
                self.failures.append(repr(e))
            i += 1
        self.client.close()


@contextlib.contextmanager
def churn_during(ctx: "Ctx", proxy_name: str):
    info: dict = {"warnings": []}
    px = ctx.extra.get("proxies", {}).get(proxy_name)
    churn = ctx.scenario.name == "churn-on"
    d0 = space_admin_json(ctx, px, "/api/discovery")["etcd"] if px else None
    churner = Churner(ctx, ctx.args.churn_interval) if churn else None
    if churner:
        churner.start()
    try:
        yield info
    finally:
        if churner:
            churner.stop_event.set()
            churner.join(10)
    if px is None:
        return
    client: EtcdClient = ctx.extra["etcd_client"]
    rev = client.revision()
    caught = wait_until(lambda: int(space_admin_json(ctx, px, "/api/discovery")["etcd"]["revision"]) >= rev, 5, 0.01)
    d1 = space_admin_json(ctx, px, "/api/discovery")["etcd"]
    info.update(etcd_revision=rev, space_revision=d1["revision"], events=d1["events"] - d0["events"],
                reconnects=d1["reconnects"] - d0["reconnects"], full_syncs=d1["full_syncs"] - d0["full_syncs"],
                caught_up_ms=None if caught is None else round(caught * 1000, 1))
    if caught is None:
        info["warnings"].append(f"etcd: space did not reach etcd revision {rev} within 5 s after the run "
                                f"(at {d1['revision']})")
    if info["reconnects"] or info["full_syncs"]:
        info["warnings"].append(f"etcd: space reconnected {info['reconnects']}x / resynced "
                                f"{info['full_syncs']}x during the run")
    if not churner:
        info["log"] = f"etcd events {info['events']}"
        return
    changes = churner.puts + churner.deletes
    expect = ctx.args.duration / ctx.args.churn_interval
    live = ctx.extra["churn_live"]
    ok_live = routed_to_churn(px, live[-1]) if live else None
    ok_gone = (not routed_to_churn(px, churner.last_deleted)) if churner.last_deleted is not None else None
    cm = sorted(churner.call_ms)
    info.update(changes=changes, puts=churner.puts, deletes=churner.deletes, change_failures=churner.failures[:5],
                change_failures_total=len(churner.failures), late_ticks=churner.late,
                changes_per_s=changes / ctx.args.duration,
                etcd_call_ms_p50=cm[len(cm) // 2] if cm else None, etcd_call_ms_max=cm[-1] if cm else None,
                live_module_routed=ok_live, deleted_module_gone=ok_gone)
    if churner.failures:
        info["warnings"].append(f"churn: {len(churner.failures)} etcd changes failed, e.g. {churner.failures[0]}")
    if changes < 0.9 * expect:
        info["warnings"].append(f"churn: only {changes} route changes in {ctx.args.duration:g}s "
                                f"(wanted ~{expect:.0f}; etcd call p50 {info['etcd_call_ms_p50']} ms)")
    if ok_live is False or ok_gone is False:
        info["warnings"].append(f"churn: after the run /churn-{live[-1] if live else '?'} routed: {ok_live}, "
                                f"deleted /churn-{churner.last_deleted} gone: {ok_gone}")
    info["log"] = (f"{changes} route changes ({churner.puts} add / {churner.deletes} delete), etcd events "
                   f"{info['events']}, caught up {info['caught_up_ms']} ms after the run")


# --------------------------------------------------------------------------
# Scenario definitions
# --------------------------------------------------------------------------

AFFINITY_BACKEND = "        add_header X-Bench-Port $server_port always;"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("http", "plain HTTP/1.1 keep-alive, GET / -> 1 KiB"),
        Scenario("tls", "HTTPS (TLS 1.2/1.3) keep-alive, GET / -> 1 KiB", tls=True),
        Scenario("affinity-off", "space without affinity, 4 instances, requests carry PHPSESSID + "
                 "space-bench cookies of --sessions sessions", backend_instances=4, lua=affinity_lua,
                 proxies=("space",), group="affinity",
                 fragments={"BACKEND_SERVER": AFFINITY_BACKEND},
                 prepare=affinity_prepare, ready=affinity_ready),
        Scenario("affinity-on", "space with affinity (routing cookie space-bench, session_cookies PHPSESSID), "
                 "4 instances, every request carries a valid learned token", backend_instances=4,
                 lua=affinity_lua, proxies=("space",), group="affinity",
                 fragments={"BACKEND_SERVER": AFFINITY_BACKEND,
                            "SPACE_MODULE": f'session_cookies = ["PHPSESSID"]\n'
                                            f'affinity = {{ cookie = "{AFFINITY_COOKIE}" }}'},
                 prepare=affinity_prepare, ready=affinity_ready, during=affinity_during,
                 check_run=affinity_check_run),
        Scenario("churn-off", "space with etcd discovery, no route changes, GET / (file module)",
                 proxies=("space",), group="churn", needs=("etcd",),
                 prepare=churn_prepare, ready=churn_ready, during=churn_during, cleanup=churn_cleanup),
        Scenario("churn-on", "space with etcd discovery, one route change every --churn-interval (100 ms) "
                 "during the run, GET / (file module)",
                 proxies=("space",), group="churn", needs=("etcd",),
                 prepare=churn_prepare, ready=churn_ready, during=churn_during, cleanup=churn_cleanup),
    )
}


@dataclass
class Comparison:
    """A ratio between two scenarios' summaries for one proxy, with the issue's target."""
    name: str
    num: str
    den: str
    proxy: str
    key: str
    what: str
    target: str
    ok: Callable[[float], bool]
    zero_errors: tuple[str, ...] = ()  # scenarios whose errors must be 0 for "meets"


COMPARISONS = [
    Comparison("affinity", "affinity-on", "affinity-off", "space", "proxy_us_per_req",
               "space CPU µs/req, affinity-on / affinity-off", "≤ 1.05", lambda r: r <= 1.05),
    Comparison("churn", "churn-on", "churn-off", "space", "rps",
               "space req/s, churn-on / churn-off", "≥ 0.95, and 0 errors with churn", lambda r: r >= 0.95,
               zero_errors=("churn-on", "churn-off")),
]


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

COLUMNS = [  # header, key, format
    ("proxy", None, None),
    ("req/s", "rps", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.3f}"),
    ("p99 ms", "p99_ms", "{:.3f}"),
    ("proxy µs/req", "proxy_us_per_req", "{:.2f}"),
    ("user/sys µs", None, None),
    ("backend µs/req", "backend_us_per_req", "{:.2f}"),
    ("vs nginx", "proxy_us_ratio_vs_nginx", "{:.2f}×"),
    ("upstream conns", "upstream_conns", "{:.0f}"),
    ("errors", "errors_total", "{:d}"),
]


def table_rows(rep: dict, all_proxies: list[str], skipped: dict[str, str]) -> list[list[str]]:
    rows = []
    for name in all_proxies:
        s = rep.get("summary", {}).get(name)
        if s is None:
            if name in skipped and name in (rep.get("scenario_proxies") or all_proxies):
                rows.append([name, f"pending ({skipped[name]})"] + [""] * (len(COLUMNS) - 2))
            continue
        row = []
        for hdr, key, fmt in COLUMNS:
            if hdr == "proxy":
                row.append(name)
            elif hdr == "user/sys µs":
                row.append(f"{s['proxy_user_us_per_req']:.1f} / {s['proxy_sys_us_per_req']:.1f}")
            else:
                v = s.get(key)
                row.append("n/a" if v is None else fmt.format(v))
        rows.append(row)
    return rows


def machine_info(args: argparse.Namespace) -> dict:
    model = mhz = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = line.split(":", 1)[1].strip()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "cpu_model": model, "cpu_mhz": mhz,
        "kernel": platform.release(),
        "os": run_text(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "virtualization": run_text(["systemd-detect-virt"]) if shutil.which("systemd-detect-virt") else None,
        "sched_autogroup": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
        if Path("/proc/sys/kernel/sched_autogroup_enabled").exists() else None,
        "clk_tck": CLK_TCK,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "nginx": run_text(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "haproxy": run_text(["haproxy", "-v"]).splitlines()[0].replace("HAProxy version ", "").split(" ")[0],
        "wrk": run_text(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].replace("wrk ", "").replace("debian/", ""),
        "openssl": run_text(["openssl", "version"]).split(" (")[0].replace("OpenSSL ", ""),
        "python": platform.python_version(),
        "space": None,
    }
    if not args.skip_space:
        v = run_text([str(args.space_path), "--version"], timeout=5)
        info["space"] = v.splitlines()[0] if v else "unknown"
        info["space_path"] = str(args.space_path)
    return info


def settings(args: argparse.Namespace) -> dict:
    return {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "wrk_threads": args.threads, "body_bytes": args.body_size,
            "proxy_cpu": args.proxy_cpu, "client_cpu": args.client_cpu, "wrk_timeout": args.wrk_timeout,
            "sessions": args.sessions, "churn_interval_s": args.churn_interval,
            "interleave": not args.no_interleave}


def comparisons(report: dict) -> list[dict]:
    """The ratios of COMPARISONS whose two scenarios both ran."""
    reps = {r["name"]: r for r in report["scenarios"] if r.get("summary")}
    out = []
    for c in COMPARISONS:
        a, b = reps.get(c.num), reps.get(c.den)
        if not a or not b or c.proxy not in a["summary"] or c.proxy not in b["summary"]:
            continue
        va, vb = a["summary"][c.proxy][c.key], b["summary"][c.proxy][c.key]
        ratio = va / vb if vb else None
        # per round (meaningful when the two ran interleaved)
        ra = {r["round"]: r[c.key] for r in a["runs"] if r["proxy"] == c.proxy}
        rb = {r["round"]: r[c.key] for r in b["runs"] if r["proxy"] == c.proxy}
        per_round = [ra[k] / rb[k] for k in sorted(ra) if k in rb and rb[k]]
        errors = {n: reps[n]["summary"][c.proxy]["errors_total"] for n in c.zero_errors if n in reps}
        replaced = {n: reps[n]["summary"][c.proxy]["client_conns_replaced"] for n in c.zero_errors if n in reps}
        meets = ratio is not None and c.ok(ratio) and not any(errors.values())
        out.append({"name": c.name, "what": c.what, "numerator": c.num, "denominator": c.den,
                    "proxy": c.proxy, "key": c.key, "numerator_value": va, "denominator_value": vb,
                    "ratio": ratio, "per_round": per_round,
                    "interleaved": a.get("group") is not None and a.get("group") == b.get("group"),
                    "errors": errors, "client_conns_replaced": replaced,
                    "target": c.target, "meets_target": meets})
    return out


def comparison_line(c: dict) -> str:
    pr = (f"; per round {min(c['per_round']):.3f}–{max(c['per_round']):.3f}" if len(c["per_round"]) > 1 else "")
    errs = (f"; errors {', '.join(f'{n} {v}' for n, v in c['errors'].items())}" if c["errors"] else "")
    def num(v: float) -> str:
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.2f}"
    return (f"{c['what']} = {num(c['numerator_value'])} / {num(c['denominator_value'])} = "
            f"**{'n/a' if c['ratio'] is None else format(c['ratio'], '.3f')}**{pr}{errs} "
            f"({'interleaved' if c['interleaved'] else 'separate runs'}); target {c['target']}: "
            f"{'meets' if c['meets_target'] else 'MISSES'}")


def scenario_notes(rep: dict) -> list[str]:
    """One line per run with what the scenario hook recorded (route changes, affinity)."""
    return [f"round {r['round']} {r['proxy']}: {r['scenario_info']['log']}"
            for r in rep.get("runs", []) if r.get("scenario_info", {}).get("log")]


def print_tables(report: dict, all_proxies: list[str], skipped: dict[str, str]) -> None:
    for rep in report["scenarios"]:
        print(f"\n== scenario {rep['name']}: {rep['description']} "
              f"(median of {report['settings']['rounds']} rounds x {report['settings']['duration_s']:g}s)")
        allrows = table_rows(rep, all_proxies, skipped)
        rows = [[h for h, _, _ in COLUMNS]] + [r for r in allrows if r[0] not in skipped]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        for r in rows:
            print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        for r in allrows:
            if r[0] in skipped:
                print(f"{r[0].ljust(widths[0])}  {r[1]}")
        for n in scenario_notes(rep):
            print(f"  - {n}")
        for w in rep.get("warnings", []):
            print(f"  ! {w}")
    if report.get("comparisons"):
        print("\n== comparisons")
        for c in report["comparisons"]:
            print("  " + comparison_line(c).replace("**", ""))


def markdown(report: dict, all_proxies: list[str], skipped: dict[str, str]) -> str:
    m, st = report["machine"], report["settings"]
    out = [f"### Results {m['date_utc']}", "",
           f"- Machine: {m['nproc']} vCPU {m['cpu_model']} ({m['virtualization'] or 'unknown virt'}), "
           f"kernel {m['kernel']}, {m['os']}",
           f"- Software: nginx {m['nginx']}, HAProxy {m['haproxy']}, wrk {m['wrk']}, OpenSSL {m['openssl']}"
           + (f", space `{m['space']}`" if m.get("space") else ""),
           f"- Load: wrk {st['wrk_threads']} thread / {st['connections']} connections pinned to CPU"
           f"{st['client_cpu']}; proxy + backend nginx (SCHED_BATCH) pinned to CPU{st['proxy_cpu']}; "
           f"{st['body_bytes']} B body; {st['rounds']} alternating rounds × {st['duration_s']:g} s "
           f"after {st['warmup_s']:g} s warm-up; medians shown.",
           f"- Command: `{report['command']}`", ""]
    for rep in report["scenarios"]:
        out += [f"#### `{rep['name']}`: {rep['description']}", ""]
        rows = table_rows(rep, all_proxies, skipped)
        out.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|")
        for r in rows:
            out.append("| " + " | ".join(r + [""] * (len(COLUMNS) - len(r))) + " |")
        tls = {n: p.get("tls") for n, p in rep.get("proxies", {}).items()}
        if rep["tls"] and tls:
            out += ["", "Negotiated with an OpenSSL client: " + ", ".join(f"{n} {t}" for n, t in tls.items())]
        if rep.get("summary"):
            rng = ", ".join(f"{n} {s['proxy_us_per_req_min']:.2f}–{s['proxy_us_per_req_max']:.2f}"
                            for n, s in rep["summary"].items())
            out += ["", f"Proxy µs/req range over rounds: {rng}."]
        notes = scenario_notes(rep)
        if notes:
            out += [""] + [f"- {n}" for n in notes]
        if rep.get("warnings"):
            out += [""] + [f"- ⚠ {w}" for w in rep["warnings"]]
        out.append("")
    if report.get("comparisons"):
        out += ["#### Comparisons", ""] + [f"- {comparison_line(c)}" for c in report["comparisons"]] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def check_tools(install: bool) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    pkgs = sorted({TOOLS[t] for t in missing})
    cmd = ["apt-get", "install", "-y", *pkgs]
    if not install:
        raise BenchError(f"missing tools: {', '.join(missing)}. Install them with:\n"
                         f"    {'sudo ' if os.geteuid() else ''}{' '.join(cmd)}\n"
                         f"(or rerun with --install)")
    sudo = ["sudo"] if os.geteuid() != 0 else []
    log("installing: " + " ".join(sudo + cmd))
    if subprocess.run(sudo + cmd).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"])
        if subprocess.run(sudo + cmd).returncode != 0:
            raise BenchError("apt-get install failed")
    still = [t for t in TOOLS if shutil.which(t) is None]
    if still:
        raise BenchError(f"still missing after install: {still}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.rsplit("\n\n", 1)[0],
        epilog="""examples:
  python3 loadtest/bench.py --rounds 3 --duration 10 --json out.json --markdown out.md
  python3 loadtest/bench.py --skip-space                   # nginx and HAProxy only
  python3 loadtest/bench.py --check-only                   # start everything, check, no load
  python3 loadtest/bench.py --space target/release/space --scenarios tls --proxies nginx,space
  python3 loadtest/bench.py --scenarios affinity-off,affinity-on --rounds 5 --duration 20   # space only
  python3 loadtest/bench.py --scenarios churn-off,churn-on --rounds 3 --duration 60        # space only, etcd

columns: req/s, p50/p99 latency (wrk), proxy µs/req = proxy CPU (user+sys, all its
processes/threads) / requests completed, backend µs/req = same for the backend nginx,
vs nginx = proxy µs/req / nginx's, upstream conns = new connections the backend
accepted during the run (keep-alive reuse check), errors = wrk socket errors +
HTTP status >= 400. See loadtest/README.md.""")
    p.add_argument("--space", dest="space_path", default="target/release/space",
                   help="space binary (default target/release/space, relative to the repo root)")
    p.add_argument("--skip-space", action="store_true", help="benchmark only nginx and HAProxy")
    p.add_argument("--proxies", default=",".join(PROXY_ORDER),
                   help="comma list, run in this order each round (default nginx,haproxy,space)")
    p.add_argument("--scenarios", default="http,tls",
                   help=f"comma list of scenarios (available: {', '.join(SCENARIOS)}; default http,tls)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per proxy per scenario (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--body-size", type=int, default=1024, help="backend response body bytes (default 1024)")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU for proxies and backend (default 0)")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU for wrk (default 1)")
    p.add_argument("--wrk-timeout", default="5s", help="wrk --timeout (default 5s)")
    p.add_argument("--ready-timeout", type=float, default=30, help="seconds to wait for readiness (default 30)")
    p.add_argument("--max-foreign", type=float, default=3.0,
                   help="warn and retry when other processes took more than this %% of the proxy CPU or "
                        "of the client CPU during a run (default 3)")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="before each run wait up to this many seconds for both CPUs to be idle (default 60; 0 = off)")
    p.add_argument("--quiet-threshold", type=float, default=10,
                   help="a CPU counts as idle below this %% busy (default 10)")
    p.add_argument("--retries", type=int, default=2,
                   help="rerun a run whose proxy CPU was shared with other processes above --max-foreign "
                        "(default 2; the discarded runs stay in the JSON)")
    p.add_argument("--sessions", type=int, default=5000,
                   help="affinity scenarios: distinct sessions (PHPSESSID + routing cookie) wrk cycles through "
                        "(default 5000)")
    p.add_argument("--churn-interval", type=float, default=0.1,
                   help="churn-on: seconds between route changes in etcd (default 0.1)")
    p.add_argument("--etcd", default="etcd", help="etcd binary for the churn scenarios (default etcd, from PATH)")
    p.add_argument("--no-interleave", action="store_true",
                   help="run scenarios of one group (affinity-off/on, churn-off/on) one after the other "
                        "instead of interleaved")
    p.add_argument("--space-env", action="append", default=[], metavar="K=V",
                   help="extra environment for space (repeatable), e.g. RUST_LOG=warn")
    p.add_argument("--json", type=Path, help="write the full report as JSON here")
    p.add_argument("--markdown", type=Path, help="write the result tables as Markdown here")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, logs, wrk output)")
    p.add_argument("--check-only", action="store_true",
                   help="start backend and proxies, run the sanity checks, stop (no load)")
    p.add_argument("--install", action="store_true", help="apt-get install missing tools")
    a = p.parse_args(argv)
    a.proxies = [x.strip() for x in a.proxies.split(",") if x.strip()]
    a.scenarios = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    for x in a.proxies:
        if x not in PROXY_CLASSES:
            p.error(f"unknown proxy {x!r} (choose from {', '.join(PROXY_CLASSES)})")
    for x in a.scenarios:
        if x not in SCENARIOS:
            p.error(f"unknown scenario {x!r} (choose from {', '.join(SCENARIOS)})")
    if a.rounds < 1 or a.duration <= 0 or a.warmup <= 0 or a.connections < a.threads:
        p.error("need --rounds >= 1, --duration > 0, --warmup > 0, --connections >= --threads")
    if a.sessions < 1 or a.churn_interval <= 0:
        p.error("need --sessions >= 1 and --churn-interval > 0")
    for kv in a.space_env:
        if "=" not in kv:
            p.error(f"--space-env wants K=V, got {kv!r}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = "python3 loadtest/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    skipped: dict[str, str] = {}
    if args.skip_space and "space" in args.proxies:
        args.proxies.remove("space")
        skipped["space"] = "not run: --skip-space"
    all_proxies = [p for p in PROXY_ORDER if p in args.proxies or p in skipped]
    try:
        check_tools(args.install)
        if "space" in args.proxies:
            sp = Path(args.space_path)
            if not sp.is_absolute() and not sp.exists():
                sp = REPO / sp
            if not sp.is_file() or not os.access(sp, os.X_OK):
                raise BenchError(f"space binary not found at {sp}; build it with: "
                                 f"cargo build --release -p space-proxy   (or pass --space PATH, or --skip-space)")
            args.space_path = sp.resolve()
        allowed = os.sched_getaffinity(0)
        for c in (args.proxy_cpu, args.client_cpu):
            if c not in allowed:
                raise BenchError(f"CPU {c} not available (allowed: {sorted(allowed)})")
        if args.proxy_cpu == args.client_cpu:
            raise BenchError("--proxy-cpu and --client-cpu must differ")
        stub = "http_stub_status_module" in run_text(["nginx", "-V"])
        if not stub:
            log("nginx lacks stub_status: upstream connection counts will be n/a")
        machine = machine_info(args)
        log(f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, kernel {machine['kernel']}, "
            f"loadavg {' '.join(machine['loadavg_at_start'])}")
        if float(machine["loadavg_at_start"][0]) > 0.5:
            log("WARNING: the machine is not idle (1-min loadavg > 0.5); results will be noisy")
        runnable: list[Scenario] = []
        for sc in (SCENARIOS[n] for n in args.scenarios):
            if sc.applicable(args.proxies):
                runnable.append(sc)
                na = [p for p in args.proxies if p not in sc.applicable(args.proxies)]
                if na:
                    log(f"[{sc.name}] applies to {', '.join(sc.proxies or ())} only; {', '.join(na)}: n/a")
            else:
                log(f"[{sc.name}] skipped: it applies to {', '.join(sc.proxies or ())} only, "
                    f"and --proxies/--skip-space leave none of them")
        if not runnable:
            raise BenchError("no scenario left to run with these --proxies")
        # scenarios of one group run interleaved, at the position of the first one
        groups: list[list[Scenario]] = []
        for sc in runnable:
            g = next((g for g in groups if sc.group and g[0].group == sc.group), None)
            if g is not None and not args.no_interleave:
                g.append(sc)
            else:
                groups.append([sc])
        for tool in sorted({t for sc in runnable for t in sc.needs}):
            exe = args.etcd if tool == "etcd" else tool
            if shutil.which(exe) is None:
                raise BenchError(f"{exe} not found (needed by {', '.join(sc.name for sc in runnable if tool in sc.needs)}); "
                                 f"install it with: {'sudo ' if os.geteuid() else ''}apt-get install -y "
                                 f"{'etcd-server' if tool == 'etcd' else tool}" + (" (or pass --etcd PATH)" if tool == "etcd" else ""))
        est = sum(len(sc.applicable(args.proxies)) * (args.warmup + args.rounds * args.duration) + 10
                  for sc in runnable)
        if not args.check_only:
            log(f"estimated run time ~{est / 60:.1f} min")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Keep the harness itself (readiness probes, /proc sampling) off the proxy CPU.
    os.sched_setaffinity(0, {args.client_cpu})
    base = Path(tempfile.mkdtemp(prefix="space-bench-"))
    os.chmod(base, 0o755)  # nginx workers drop privileges when run as root
    log(f"work dir {base}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    report = {"command": cmdline, "machine": machine, "settings": settings(args), "scenarios": [],
              "skipped": skipped, "workdir": str(base)}
    ok = False
    try:
        for g in groups:
            if len(g) > 1:
                log(f"running {' and '.join(sc.name for sc in g)} interleaved (group {g[0].group})")
            report["scenarios"].extend(run_group(args, g, base, args.proxies, stub))
        ok = True
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        stop_all()
    report["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report["comparisons"] = comparisons(report)

    if not args.check_only and report["scenarios"] and any("summary" in s for s in report["scenarios"]):
        done = [s for s in report["scenarios"] if "summary" in s]
        rep_done = {**report, "scenarios": done}
        print_tables(rep_done, all_proxies, skipped)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
        if args.markdown:
            args.markdown.write_text(markdown(rep_done, all_proxies, skipped))
            log(f"wrote {args.markdown}")
    elif args.check_only and ok:
        for rep in report["scenarios"]:
            for n, info in rep["proxies"].items():
                print(f"[{rep['name']}] {n}: OK; TLS {info['tls']}; echo(https) {info['echo_https']}"
                      + (f"\n  scenario check: {json.dumps(info['scenario_check'])}" if info.get("scenario_check") else "")
                      + "".join(f"\n  ! {w}" for w in info["warnings"]))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if ok and not args.keep_workdir:
        shutil.rmtree(base, ignore_errors=True)
    else:
        log(f"configs, logs and raw wrk output kept in {base}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
