"""A throw-away PostgreSQL server for the tests of tuner workers sharing one study.

The server is Debian's `postgresql` package (`make test` installs it where apt-get exists):
`initdb` and `pg_ctl` from /usr/lib/postgresql/*/bin (or $PG_BIN), a data directory in a
temporary folder, no TCP port (`listen_addresses=''`), a Unix socket in that folder and trust
authentication, so nothing else on the machine can reach it and no password exists. PostgreSQL
refuses to run as root: as root the server runs as the `postgres` user, which owns the folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 120


def pg_bin() -> Path | None:
    """$PG_BIN, else the newest /usr/lib/postgresql/<version>/bin holding initdb."""
    if os.environ.get("PG_BIN"):
        given = Path(os.environ["PG_BIN"])
        return given if (given / "initdb").is_file() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the postgres user when we are root (the server refuses root)."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--", *command] if runuser else ["su", "postgres", "-c", " ".join(command)]


def missing_reason() -> str | None:
    """Why no server can be started here, or None."""
    if pg_bin() is None:
        return "PostgreSQL is not installed (Debian's `postgresql` package; `make postgres` installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


def new_database(url: str, name: str) -> str:
    """Create the database `name` on the server at `url`; its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.replace("/postgres?", f"/{name}?")


@contextmanager
def server() -> Iterator[str]:
    """Start a server; yield its URL (`postgresql://postgres@/postgres?host=SOCKET_DIR`)."""
    binary = pg_bin()
    assert binary is not None, missing_reason()
    root = Path(tempfile.mkdtemp(prefix="zeroplan-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, log = root / "data", root / "server.log"
    run = lambda *cmd: subprocess.run(_as_server_user([str(c) for c in cmd]), check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=START_TIMEOUT_S)
    try:
        run(binary / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(binary / "pg_ctl", "-D", data, "-l", log, "-w", "-t", START_TIMEOUT_S, "start", "-o",
            f"-c listen_addresses='' -k {root} -c fsync=off -c max_connections=100")
        try:
            yield f"postgresql://postgres@/postgres?host={root}"
        finally:
            run(binary / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{' '.join(e.cmd)} exited {e.returncode}: {e.stderr[-2000:]}\n{tail}") from e
    finally:
        shutil.rmtree(root, ignore_errors=True)
