"""The client SDK must import and work where torch and transformers cannot be imported."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import sys
    for name in ("torch", "transformers"):
        sys.modules[name] = None  # any `import torch` now raises ImportError
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch import was not blocked")

    import importlib
    import pkgutil

    import numpy as np
    import client_sdk
    # every module of the SDK (and the demo driver, which must stay light too)
    import vlm_demo
    for package in (client_sdk, vlm_demo):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    assert "client_sdk.async_client" in sys.modules and "client_sdk.cli" in sys.modules
    client = client_sdk.Client("127.0.0.1:1", "127.0.0.1:1")
    client.close()
    from vlm_protocol import tensor_codec

    png = b"\\x89PNG fake bytes are fine for hashing"
    from vlm_protocol.media_ids import PreprocessingIdentity
    cid = client_sdk.image_content_id(png, PreprocessingIdentity("llava", "m", "p"))
    assert cid.startswith("b3:") and len(cid) == 3 + 64, cid
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = tensor_codec.decode_numpy(tensor_codec.encode_numpy(arr))
    assert (back == arr).all()
    bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None]
    assert not bad, bad
    print("ok", cid)
    """
)


def test_client_sdk_works_without_torch_or_transformers():
    env_path = f"{REPO}{':' + str(REPO / 'protos/gen/python')}"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=REPO,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok b3:")
