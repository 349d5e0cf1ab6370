#!/usr/bin/env python3
"""Stand-in for the `space` binary, to test bench.py's space code path only.

NOT a benchmark of space. It accepts `run --config FILE`, reads the generated
space.toml with tomllib (so a malformed config fails here), checks the keys
the harness relies on, writes an equivalent HAProxy config (HTTP, HTTPS from
[tls].cert_dir/bench.crt+bench.key, admin listener answering GET /readyz with
200, the module's instances as servers) and exec()s HAProxy, so the pid the
harness measures is the process doing the work.

    python3 loadtest/bench.py --space loadtest/selftest_fake_space.py --check-only
"""
import os
import shutil
import sys
import tomllib
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "run" or sys.argv[2] != "--config":
        if "--version" in sys.argv:
            print("fake-space (HAProxy stand-in for harness self-test)")
            return
        sys.exit("usage: selftest_fake_space.py run --config FILE")
    cfg_path = Path(sys.argv[3])
    cfg = tomllib.loads(cfg_path.read_text())
    srv, lis, tls, mods = cfg["server"], cfg["listeners"], cfg["tls"], cfg["module"]
    assert srv["threads"] == 1 and isinstance(srv["grace_period"], str), srv
    assert set(lis) == {"http", "https", "admin"}, lis
    assert len(mods) == 1 and mods[0]["prefixes"] == ["/"], mods
    assert mods[0]["health_check"] == {"enabled": False}, mods[0]
    certs = Path(tls["cert_dir"])
    pem = cfg_path.parent / "fake-space.pem"
    pem.write_text((certs / "bench.crt").read_text() + (certs / "bench.key").read_text())
    servers = "\n".join(f"    server s{i} {inst['addr']}" for i, inst in enumerate(mods[0]["instances"]))
    hacfg = cfg_path.parent / "fake-space-haproxy.cfg"
    hacfg.write_text(f"""global
    nbthread {srv['threads']}
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend admin
    bind {lis['admin']}
    http-request return status 200 content-type text/plain string ready if {{ path /readyz }}
    http-request return status 404
frontend fe_http
    bind {lis['http']}
    http-request set-header X-Forwarded-Proto http
    default_backend be
frontend fe_https
    bind {lis['https']} ssl crt {pem}
    http-request set-header X-Forwarded-Proto https
    default_backend be
backend be
{servers}
""")
    haproxy = shutil.which("haproxy") or sys.exit("haproxy not found")
    os.execv(haproxy, [haproxy, "-db", "-f", str(hacfg)])


if __name__ == "__main__":
    main()
