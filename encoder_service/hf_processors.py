"""Load a checkpoint's Hugging Face processor, also on hosts without torchvision.

transformers 5 cannot build `LlavaOnevisionProcessor` without torchvision (its video processor
needs it), even for images only. There we build it with an empty video slot; video frames then go
through the image processor (one crop per frame), which is the same transform.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaOnevisionProcessor
from transformers.utils import is_torchvision_available


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor with an empty video slot, for hosts without torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(checkpoint_dir: str | Path):
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    if config.get("model_type") != "llava_onevision" or is_torchvision_available():
        return AutoProcessor.from_pretrained(checkpoint_dir)
    kwargs = json.loads((checkpoint_dir / "processor_config.json").read_text())
    kwargs.pop("processor_class", None)
    template = checkpoint_dir / "chat_template.jinja"
    return ImageOnlyOnevisionProcessor(
        image_processor=AutoImageProcessor.from_pretrained(checkpoint_dir),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint_dir),
        video_processor=None,
        chat_template=template.read_text() if template.is_file() else None,
        **kwargs,
    )
