"""Model zoo: one file per family, all sharing the contract in `_base.py`.

Importing this package registers every family.
"""

from imgarena.models._registry import (check_model_fits, create_model, get_entry, list_models,  # noqa: F401
                                      register_model)
from imgarena.models import mlp, cnn, mixer, vit, convnext, resnet, mobilenet, swin  # noqa: F401,E402

__all__ = ["check_model_fits", "create_model", "list_models", "register_model", "get_entry"]
