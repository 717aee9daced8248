"""Image encoders: a registry over timm. This package imports nothing else from the project."""

from vlm.encoders import convstem  # noqa: F401,E402  (registers vit_convstem)
from vlm.encoders.registry import ImageEncoder, create_encoder, list_encoders, register_encoder

__all__ = ["ImageEncoder", "create_encoder", "list_encoders", "register_encoder"]
