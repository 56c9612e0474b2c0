"""A throwaway PostgreSQL server for the tests (docs/calibration.md): a cluster in a temporary folder, on a free
loopback port, with its unix socket in that folder; stopped and removed on exit, also when a test fails.

PostgreSQL refuses to run as root, so under root (CI) the cluster runs as the unprivileged `postgres` user
through `runuser`. Where the binaries, that user or the driver are missing, `missing()` says what to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

USER, PASSWORD = "prunevlm", "s3cret-pw"  # the cluster's superuser; TCP connections need the password


def binaries() -> str | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0]))
    return next((f for f in reversed(folders) if os.path.exists(f"{f}/initdb") and os.path.exists(f"{f}/pg_ctl")), None)


def missing() -> str | None:
    """What keeps the server from starting here, with what to install; None when it can start."""
    try:
        import psycopg  # noqa: F401 -- SQLAlchemy's driver for postgresql:// URLs (from SQLAlchemy 2.1 on)
    except ImportError:
        return "the PostgreSQL driver is not installed: pip install -e '.[calibrate]' (psycopg[binary])"
    if binaries() is None:
        return ("the PostgreSQL server binaries (initdb, pg_ctl) are missing: install them, e.g. "
                "apt-get install postgresql (Debian/Ubuntu) or dnf install postgresql-server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and PostgreSQL refuses root: create an unprivileged user named postgres"
        if shutil.which("runuser") is None:
            return "running as root, and runuser (util-linux) is missing to start the server as user postgres"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running cluster: `url(database)` for a database `create(name)` made."""

    def __init__(self, port: int, folder: str):
        self.port, self.folder = port, folder

    def url(self, database: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def create(self, database: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        return self.url(database)


@contextlib.contextmanager
def throwaway_server():
    """Start a cluster, yield its Server, and stop and remove it whatever happens."""
    folder = tempfile.mkdtemp(prefix="prunevlm-pg-")  # short: the socket path has a length limit
    as_user = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    bin_dir, data, port = binaries(), f"{folder}/data", free_port()

    def run(*command):
        done = subprocess.run([*as_user, *command], cwd=folder, capture_output=True, text=True, timeout=60)
        if done.returncode:
            log = open(f"{folder}/log").read() if os.path.exists(f"{folder}/log") else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr or done.stdout}\n{log[-2000:]}")

    started = False
    try:
        with open(f"{folder}/password", "w") as f:
            f.write(PASSWORD)
        if as_user:
            os.chown(f"{folder}/password", pwd.getpwnam("postgres").pw_uid, -1)
        run(f"{bin_dir}/initdb", "-D", data, "-U", USER, f"--pwfile={folder}/password", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        started = True  # from here on, stop it: a start that timed out may still leave a server running
        run(f"{bin_dir}/pg_ctl", "-D", data, "-l", f"{folder}/log", "-o", options, "-w", "-t", "30", "start")
        yield Server(port, folder)
    finally:
        if started:
            subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], cwd=folder,
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
