"""Thin client for the VLM serving stack (no torch, no transformers).

Needs only grpcio, protobuf, numpy, Pillow and blake3. Media helpers turn user images into the
wire form and compute their content ids with the same function the services use.
"""

from client_sdk.media import ImageInput, image_content_id, load_image_bytes

__all__ = ["ImageInput", "image_content_id", "load_image_bytes"]
