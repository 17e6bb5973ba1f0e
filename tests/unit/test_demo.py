"""The demo driver's light parts: the bundled picture, service start-up failures, argument checks.

The full demo (tiny checkpoint, both services, two requests) runs in tests/e2e/test_end_to_end.py.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vlm_demo import __main__ as demo
from vlm_demo import sample_image
from vlm_demo.services import ServiceError, ServiceProcess, child_env, free_port, wait_until_serving


def test_bundled_picture_is_the_deterministic_drawing():
    assert sample_image.ASSET_PATH.is_file(), "run python -m vlm_demo.sample_image"
    bundled = np.asarray(Image.open(io.BytesIO(sample_image.sample_png_bytes())).convert("RGB"))
    drawn = np.asarray(sample_image.draw_sample_image())
    assert bundled.shape == (sample_image.HEIGHT, sample_image.WIDTH, 3)
    assert np.array_equal(bundled, drawn)


def test_a_service_that_dies_is_reported_with_its_log(tmp_path):
    service = ServiceProcess("encoder", "no_such_service_module", tmp_path, tmp_path / "encoder.log")
    service.start()
    with pytest.raises(ServiceError) as info:
        wait_until_serving([service], timeout_s=60)
    message = str(info.value)
    assert "encoder service exited with code" in message
    assert "No module named no_such_service_module" in message  # the log tail
    assert service.stop() not in (None, 0)


def test_free_port_is_bindable():
    assert 0 < free_port() < 65536


def test_demo_rejects_a_directory_without_a_checkpoint(tmp_path, capsys):
    assert demo.main(["--model", str(tmp_path)]) == demo.EXIT_FAILED
    assert "no config.json" in capsys.readouterr().out


def test_demo_arguments():
    args = demo.build_parser().parse_args([])
    assert args.family == "llava" and args.model is None
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--family", "gpt2"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_services_stop_when_the_process_that_started_them_is_killed(tmp_path):
    """A demo or benchmark killed outright (SIGKILL, a `timeout`) must not leave its services running."""
    (tmp_path / "sleeping_service.py").write_text("import time\ntime.sleep(120)\n")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from vlm_demo.services import ServiceProcess, child_env\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        "env = child_env({'PYTHONPATH': str(tmp) + os.pathsep + os.environ.get('PYTHONPATH', '')})\n"
        "service = ServiceProcess('sleeper', 'sleeping_service', tmp, tmp / 'sleeper.log', env=env)\n"
        "service.start()\n"
        "print(service.process.pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(parent)], capture_output=True, text=True, timeout=60, env=child_env()
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the service outlived the killed parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (reaped by init soon) counts as gone
        return stat.read().split(") ")[-1][0] != "Z"
