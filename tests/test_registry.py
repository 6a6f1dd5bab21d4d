import pytest
import torch

from imgarena.errors import UserError
from imgarena.models import create_model, list_models, register_model
from imgarena.models.mlp import build_mlp


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", build_mlp, family="mlp")


def test_unknown_model_lists_closest():
    with pytest.raises(UserError, match="closest: .*mlp"):
        create_model("mlpp", num_classes=3)


def test_list_models_pattern():
    assert "mlp" in list_models("mlp*")
    assert all(n.startswith("mlp") for n in list_models("mlp*"))


def test_mlp_contract_and_reset_classifier():
    m = create_model("mlp", num_classes=4, in_chans=1, img_size=12)
    x = torch.randn(2, 1, 12, 12)
    feats = m.forward_features(x)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 200)
    assert m(x).shape == (2, 4) and m.num_classes == 4
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.num_classes == 7
    assert m.input_spec["img_size"] == 12 and m.input_spec["in_chans"] == 1
    assert m.model_name == "mlp" and m.model_kwargs["img_size"] == 12
