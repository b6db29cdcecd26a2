"""A local S3-compatible server (moto) on 127.0.0.1 for tests, benchmarks and trying the s3:// path without a cloud
account.

`start_moto_server()` runs moto's standalone server on a free port and returns (process, endpoint URL); point the
standard AWS variables at it (`os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)`), create a bucket, and use
`s3://<bucket>/<prefix>` as ROOT. `stop_moto_server(process)` stops it. moto is a test dependency, imported only
when a server is started.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "gats-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto_server() -> tuple[subprocess.Popen, str]:
    """Start moto's standalone S3 server on a free 127.0.0.1 port; returns (process, endpoint URL)."""
    try:
        import moto.server  # noqa: F401  (only to fail early, with the fix, when moto[server] is missing)
    except ImportError as exc:
        raise ModuleNotFoundError(f"The local S3 server needs moto[server] ({exc}). Install the test extras: "
                                  "pip install -e '.[test]'") from exc
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: is moto[server] installed? "
                               "pip install -e '.[test]'")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    stop_moto_server(proc)
    raise RuntimeError(f"moto_server did not start listening on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s.")


def stop_moto_server(proc: subprocess.Popen) -> None:
    """Terminate the server (kill it if it has not exited within 10 s) and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
