"""Start and stop a real, isolated Ray head for tests.

Other Ray clusters may run on the same machine, so the head gets free ports and its own temp dir, and it is
stopped by killing the process group we started (never `ray stop`, which would stop everyone's Ray).
Token auth stays on: the head and the client both read the token from `RAY_AUTH_TOKEN`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def free_port_range(width: int = 40) -> int:
    """A start port with `width` free ports after it (worker ports), found by probing."""
    for _ in range(50):
        start = free_ports(1)[0]
        if start + width > 65000:
            continue
        ok = True
        for p in range(start, start + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")


@dataclass
class Head:
    address: str          # http://127.0.0.1:PORT, the job API / dashboard
    gcs_address: str      # 127.0.0.1:PORT
    token: str
    env: dict             # environment a client needs (token, no RAY_ADDRESS surprises)
    temp_dir: str
    proc: subprocess.Popen

    def stop(self) -> None:
        """SIGTERM the head's process group, then SIGKILL it and any straggler that runs from our temp dir.

        `ray start --block` never exited within 15 s of SIGTERM (it waited that long at every module's end), so
        the grace period is short: the jobs it ran are over, and what lingers is killed below."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=3)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        # Some Ray processes start their own session; they still name our unique temp dir on their command line.
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 2, extra_env: dict | None = None, resources: dict | None = None,
               timeout: float = 90) -> Head:
    gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics, rt_agent = free_ports(9)
    worker_start = free_port_range(40)
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    env.update(extra_env or {})
    cmd = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--port={gcs}", f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_listen}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--min-worker-port={worker_start}",
           f"--max-worker-port={worker_start + 39}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if resources:
        import json

        cmd.append(f"--resources={json.dumps(resources)}")
    log = open(Path(temp_dir) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token, env, temp_dir, proc)
    deadline = time.time() + timeout
    import requests

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited early:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
        try:
            r = requests.get(f"{head.address}/api/version", timeout=2,
                             headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                # The job API is a separate module that may come up a moment after /api/version.
                r = requests.get(f"{head.address}/api/jobs/", timeout=2,
                                 headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    return head
        except requests.RequestException:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError(f"ray head did not come up in {timeout}s:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")


# --- fixtures --------------------------------------------------------------------------------------------

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    """A real local head (2 CPUs, dashboard on 127.0.0.1, token auth on), stopped after the module.

    Like the shipped cluster files, the head offers one `korch_job_slot` (for `korch submit --exclusive`).
    """
    head = start_head(num_cpus=2, resources={"korch_job_slot": 1}, extra_env={"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def cli(capsys):
    """Run `korch ...` in-process; returns (exit code, stdout, stderr)."""
    from korch.cli import main

    def run(*argv: str):
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
