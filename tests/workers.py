"""`prunevlm calibrate` worker processes for the tests of shared studies (test_calibrate.py, on SQLite, and
test_calibrate_postgres.py): their output read as it comes, so a test can wait for a line and pause or kill a
worker at a known point instead of hoping the machine's timing falls its way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class Worker:
    """`python -m prunevlm.cli ARGS` in its own session (so a signal reaches all of it), stdout and stderr
    together in `lines`."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.process = subprocess.Popen([sys.executable, "-m", "prunevlm.cli", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.pid, self.lines = self.process.pid, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until the worker has printed a line holding `text` ("calibrating ...": it has loaded the model)."""
        deadline = time.time() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.process.poll() is None, f"the worker stopped before printing {text!r}: {self.log()[-2000:]}"
            assert time.time() < deadline, f"the worker printed no {text!r} in {timeout} s"
            time.sleep(0.02)

    def signal(self, number) -> None:
        os.killpg(self.pid, number)

    def log(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 120) -> str:
        """Wait for the worker; its output, after checking that it succeeded."""
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        assert self.process.returncode == 0, self.log()[-3000:]
        return self.log()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait()


def start_together(workers: list[Worker]) -> None:
    """Hold every worker (paused) once it has loaded its model until all have, so that they start their trials
    together and none can finish a study alone on a machine where another starts much later."""
    for worker in workers:
        worker.wait_for("calibrating")
        worker.signal(signal.SIGSTOP)
    for worker in workers:
        worker.signal(signal.SIGCONT)
