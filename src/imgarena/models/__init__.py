"""Model zoo: one file per family, all sharing the contract in `_base.py`.

Importing this package registers every family.
"""

from imgarena.models._registry import create_model, get_entry, list_models, register_model  # noqa: F401
from imgarena.models import mlp, cnn, mixer, vit, convnext, resnet, mobilenet, swin  # noqa: F401,E402

__all__ = ["create_model", "list_models", "register_model", "get_entry"]
