"""``alignx serve`` as a user runs it: a bad run is one line; SIGTERM finishes the request in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from alignx.serving.app import free_port
from tests.serving.test_app import post


def test_a_bad_run_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "alignx", "serve", "--run", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("alignx: error:")


def test_sigterm_finishes_the_request_in_flight(tiny_stage2_run):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ALIGNX_API_KEY"}
    # A long batch window keeps the request in flight when the signal arrives.
    process = subprocess.Popen(
        [sys.executable, "-m", "alignx", "serve", "--run", str(tiny_stage2_run.run_dir), "--port", str(port),
         "--model-name", "tiny", "--max-new-tokens", "4", "--batch-wait-ms", "1500", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "no start"
                time.sleep(0.2)
        answers = []
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0})
        thread = threading.Thread(target=lambda: answers.append(post(f"{url}/v1/chat/completions", body, key=None)))
        thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
        status, payload = answers[0]
        assert status == 200 and payload["choices"][0]["finish_reason"] in {"stop", "length"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
