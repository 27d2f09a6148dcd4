"""Start the bank past one process: PostgreSQL (if none answers), N apps, nginx.

    python -m bank.cluster --apps 2            # until Ctrl-C
    python -m bank.cluster --apps 2 --own-postgres

Everything listens on 127.0.0.1 only. nginx routes with
`hash $account consistent`, the account taken from the URL path, so all
requests of one account meet in one process (and in one keybatch batch).
Without `--own-postgres`, it uses the server at DATABASE_URL when one answers,
and otherwise starts a throwaway cluster (Debian's PostgreSQL) in a temporary
directory on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "App",
    "Cluster",
    "Postgres",
    "find_nginx",
    "free_port",
    "open_cluster",
    "postgres_answers",
    "start_app",
    "start_nginx",
    "start_postgres",
]

HERE = Path(__file__).resolve().parent.parent  # examples/bank
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout} s")
        time.sleep(0.05)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


# --- PostgreSQL --------------------------------------------------------------


def postgres_answers(dsn: str) -> bool:
    """True when a server accepts this DSN (pg_isready, falling back to psycopg)."""
    isready = shutil.which("pg_isready")
    if isready:
        result = subprocess.run(
            [isready, "-d", dsn, "-t", "2"], capture_output=True, check=False
        )
        return result.returncode == 0
    try:
        import psycopg

        psycopg.connect(dsn, connect_timeout=2).close()
        return True
    except Exception:
        return False


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError("initdb not found: apt-get install postgresql")


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster in a temporary directory."""

    dsn: str
    datadir: Path
    port: int
    bindir: Path
    user: str | None  # run as this OS user (root may not run postgres)

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True)

    def start(self) -> None:
        self._run("-w", "-t", "60", "-l", str(self.datadir / "log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


def start_postgres(root: Path, port: int | None = None) -> Postgres:
    """initdb and start a cluster under `root`, on 127.0.0.1 only."""
    bindir = _pg_bindir()
    port = port or free_port()
    datadir = root / "pgdata"
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = "postgres"
        shutil.chown(root, user)
    command = [
        str(bindir / "initdb"),
        "-D",
        str(datadir),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]
    if user:
        command = ["runuser", "-u", user, "--", *command]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode:
        raise OSError(f"initdb failed: {done.stderr.decode(errors='replace')}")
    with open(datadir / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{root}'\nmax_connections = 200\n"
        )
    pg = Postgres(
        f"postgresql://postgres@127.0.0.1:{port}/postgres", datadir, port, bindir, user
    )
    pg.start()
    return pg


# --- app processes -----------------------------------------------------------


@dataclass
class App:
    port: int
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    server: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the process dies at once, with its queued operations."""
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the server finishes its requests, then the lifespan ends."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_app(
    port: int,
    env: dict[str, str],
    server: str = "uvicorn",
    log: Path | None = None,
    wait: bool = True,
) -> App:
    """One app process on 127.0.0.1:port: uvicorn (asyncio) or hypercorn (trio)."""
    bindir = Path(sys.executable).parent
    if server == "uvicorn":
        command = [
            str(bindir / "uvicorn"),
            "bank.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
            "--timeout-graceful-shutdown",
            "20",
        ]
    elif server == "hypercorn":
        command = [
            str(bindir / "hypercorn"),
            "--worker-class",
            "trio",
            "--bind",
            f"127.0.0.1:{port}",
            "--backlog",
            "4096",
            "--graceful-timeout",
            "20",
            "bank.app:app",
        ]
    else:
        raise ValueError(f"unknown server {server!r}")
    with open(log or os.devnull, "ab") as out:  # the child keeps its own copy
        process = subprocess.Popen(
            command,
            cwd=HERE,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    app = App(port, process, env, server)
    if wait:
        wait_for_app(app)
    return app


def wait_for_app(app: App, timeout: float = 30.0) -> None:
    def up() -> bool:
        if app.process.poll() is not None:
            raise RuntimeError(
                f"app on port {app.port} exited: {app.process.returncode}"
            )
        return _http_ok(app.url + "/health")

    deadline = time.monotonic() + timeout
    while True:
        try:
            if up():
                return
        except RuntimeError:
            raise
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"app on port {app.port} did not come up")
        time.sleep(0.05)


# --- nginx -------------------------------------------------------------------


def find_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if not found:
        raise FileNotFoundError("nginx not found: apt-get install nginx")
    return found


NGINX_CONF = """\
# Generated by bank.cluster: loopback only, no state outside {root}.
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
daemon off;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    # The app refuses bodies over 1 KiB itself; nginx refuses past 4 KiB.
    client_max_body_size 4k;

    # The account in the URL path is the routing key: /accounts/<id>[/...]
    map $uri $account {{
        ~^/accounts/(?<id>[^/]+) $id;
        default "";
    }}

    upstream bank {{
        # Consistent hashing: each account goes to one app process; when one
        # fails, only its accounts move (to the next on the ring).
        hash $account consistent;
{servers}
        keepalive 256;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bank;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A POST is passed to the next server only if it was never sent
            # (connection refused): a request that reached a process that
            # then died gets 502, and the client retries with its key.
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


def start_nginx(
    port: int, upstreams: Sequence[int], root: Path, fail_timeout: float = 2.0
) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    seconds = max(1, round(fail_timeout))  # nginx takes whole seconds here
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout={seconds}s;"
        for p in upstreams
    )
    user = "user root;" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, servers=servers, user=user))
    with open(root / "stderr.log", "ab") as err:
        process = subprocess.Popen(
            [find_nginx(), "-c", str(conf), "-p", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError((root / "stderr.log").read_text())
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    deadline = time.monotonic() + 15
    while True:
        try:
            listening()
            return process
        except RuntimeError:
            raise
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- all together ------------------------------------------------------------


@dataclass
class Cluster:
    dsn: str
    schema: str
    apps: list[App]
    url: str  # nginx
    root: Path
    postgres: Postgres | None = None  # set when this cluster started it
    env: dict[str, str] = field(default_factory=dict)

    def restart_app(self, index: int, server: str = "uvicorn") -> App:
        old = self.apps[index]
        app = start_app(old.port, old.env, old.server, self.root / f"app{index}.log")
        self.apps[index] = app
        return app


@contextlib.contextmanager
def open_cluster(
    apps: int = 2,
    *,
    dsn: str | None = None,
    own_postgres: bool = False,
    schema: str = "bank",
    env: dict[str, str] | None = None,
    server: str = "uvicorn",
    nginx: bool = True,
    port: int | None = None,
) -> Iterator[Cluster]:
    """PostgreSQL (reused or started), `apps` app processes, nginx in front."""
    dsn = dsn or os.environ.get("DATABASE_URL", DEFAULT_DSN)
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bank-")))
        os.chmod(root, 0o755)
        pg = None
        if own_postgres or not postgres_answers(dsn):
            pgroot = root / "pg"
            pgroot.mkdir()
            pg = start_postgres(pgroot)
            stack.callback(lambda: pg.stop("immediate"))
            dsn = pg.dsn
        app_env = {"DATABASE_URL": dsn, "BANK_SCHEMA": schema, **(env or {})}
        started: list[App] = []

        def stop_apps() -> None:
            for app in started:
                app.stop()

        stack.callback(stop_apps)
        for i in range(apps):
            started.append(
                start_app(free_port(), app_env, server, root / f"app{i}.log", False)
            )
        for app in started:
            wait_for_app(app)
        url = started[0].url
        if nginx:
            nginx_port = port or free_port()
            process = start_nginx(nginx_port, [a.port for a in started], root / "nginx")

            def stop_nginx() -> None:
                process.terminate()
                process.wait(10)

            stack.callback(stop_nginx)
            url = f"http://127.0.0.1:{nginx_port}"
        yield Cluster(dsn, schema, started, url, root, pg, app_env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--apps", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080, help="nginx's port")
    parser.add_argument("--own-postgres", action="store_true")
    parser.add_argument("--server", choices=["uvicorn", "hypercorn"], default="uvicorn")
    parser.add_argument("--schema", default="bank")
    args = parser.parse_args(argv)
    with open_cluster(
        args.apps,
        own_postgres=args.own_postgres,
        schema=args.schema,
        server=args.server,
        port=args.port,
    ) as cluster:
        print(f"PostgreSQL: {cluster.dsn} (schema {cluster.schema})")
        for app in cluster.apps:
            print(f"app pid {app.process.pid}: {app.url}")
        print(f"nginx: {cluster.url}   (Ctrl-C stops everything)")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
