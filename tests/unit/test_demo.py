"""The demo driver's light parts: the bundled picture, service start-up failures, argument checks.

The full demo (tiny checkpoint, both services, two requests) runs in tests/e2e/test_end_to_end.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlm_demo import __main__ as demo
from vlm_demo import sample_image
from vlm_demo.services import ServiceError, ServiceProcess, free_port, wait_until_serving


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
