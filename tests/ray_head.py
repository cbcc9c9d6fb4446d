"""A real local Ray cluster for tests, in processes of its own, and Ray drivers run as child processes.

The test process itself never calls ``ray.init``. A Ray driver keeps native threads
(gRPC's timers and pollers, the GCS client's and the core worker's event loops, the
metrics harvester) running after ``ray.shutdown()`` until the process exits, where
they run on while the interpreter and the libraries tear down. CI once ended in a
segmentation fault at the test process's exit, after every integration test had
passed. In the same suite run here, Ray's were the threads of other libraries still
running and waking at that point (the crash did not recur here: not proven the cause).
So the cluster is started with ``ray start --head`` and every driver
(``tilead-train --ray-address``, ``tilead-serve``) is a child process, as it is on a
factory's machines.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``RAY_ADDRESS``, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"PYTHONUNBUFFERED": "1"} | dict(extra or {})


def run_tool(
    args: Sequence[str], *, timeout: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the environment's console scripts (``tilead-train``, ``ray``, ...) to its end.

    Args:
        args: The script's name, then its arguments.
        timeout: Seconds before the child is killed (the test then fails).
        env: Extra environment variables.

    Returns:
        The finished process, output captured as text.
    """
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        check=False,
    )


@dataclass(frozen=True)
class RayCluster:
    """A running test cluster.

    Attributes:
        address: ``127.0.0.1:PORT``, for ``--ray-address``.
        env: What a driver's environment needs to join it (the cluster's token: Ray 2.59 and later
            authenticate local clusters by default).
    """

    address: str
    env: Mapping[str, str]


@contextmanager
def ray_head(root: Path, num_cpus: int = 2, env: Mapping[str, str] | None = None) -> Iterator[RayCluster]:
    """A one-node Ray cluster, ``ray start --head --block`` in a process group of its own; killed after.

    Only this cluster's processes are stopped (``ray stop`` would stop every Ray on the machine).

    Args:
        root: A folder for the cluster's token, session files and log (short: Ray's sockets live there).
        num_cpus: CPUs the node offers to tasks and actors.
        env: Extra environment variables for the node's processes; its workers inherit them.

    Yields:
        The cluster.
    """
    root.mkdir(parents=True, exist_ok=True)
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    args = [f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats"]
    log = root / "ray_start.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={root / 'ray'}", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env({**auth, **(env or {})}),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text():
            assert head.poll() is None, f"ray start failed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ray start did not finish in 180 s:\n{log.read_text()}"
            time.sleep(0.2)
        yield RayCluster(f"127.0.0.1:{port}", auth)
    finally:
        # Killed, not terminated: on SIGTERM `ray start` first waits up to 30 s to drain the node, and the
        # node's agents ignore SIGTERM. The whole group goes: the node's processes are the head's children.
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


class ServeProcess:
    """``tilead-serve`` as a child process, ready once it printed its ``serving:`` line.

    Args:
        args: ``tilead-serve``'s arguments (the bundle, ``--port``, ...).
        timeout: Seconds to wait for the ``serving:`` line.
        env: Extra environment variables (a cluster's ``env`` to join it).
    """

    def __init__(self, args: Sequence[str], timeout: float = 180, env: Mapping[str, str] | None = None) -> None:
        cmd = [str(BIN / "tilead-serve"), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env))
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and not line.startswith("serving:"):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        if not line.startswith("serving:"):
            self.kill()
            raise AssertionError(f"tilead-serve did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        found = re.search(r" on (http://\S+) \(", line)
        assert found, line
        self.url = found.group(1)

    def stop(self, timeout: float = 120) -> tuple[int, str]:
        """SIGTERM, then wait for the exit.

        Returns:
            ``(exit status, everything printed on stderr)``.
        """
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def kill(self) -> None:
        """Kill the child if it still runs (cleanup after a failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
