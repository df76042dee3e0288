"""The offline EfficientNet-Lite weights really are ImageNet classifiers after conversion."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from patchwatch.anomaly.backbone import (OFFLINE_WEIGHTS, BackboneUnavailable, convert_lukemelas_state_dict,
                              create_backbone, import_timm, normalisation, offline_weights_path)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_converted_weights_classify_chelsea_as_a_cat(name):
    model = create_backbone(name)
    mean, std = normalisation(name)
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)[None]
    image = F.interpolate(image, size=(240, 240), mode="bilinear", antialias=True)
    image = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model(image).softmax(1)[0]
    assert int(probabilities.argmax()) in CAT_CLASSES
    assert float(probabilities[list(CAT_CLASSES)].sum()) > 0.5


def test_conversion_maps_every_key_onto_timm():
    timm = import_timm()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(offline_weights_path("tf_efficientnet_lite0"), weights_only=True)
    converted = convert_lukemelas_state_dict(source, model)
    assert set(converted) == set(model.state_dict())
    with pytest.raises(KeyError, match="unexpected EfficientNet weight"):
        convert_lukemelas_state_dict({**source, "_blocks.0._mystery.weight": torch.zeros(1)}, model)


def test_feature_stages_load_offline():
    model = create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    outputs = model(torch.zeros(1, 3, 64, 96))
    assert [o.shape[-2:] for o in outputs] == [(4, 6), (2, 3)]


def test_hub_model_without_network_fails_clearly():
    with pytest.raises(BackboneUnavailable, match="resnet18.*model hub"):
        create_backbone("resnet18")


def test_unknown_model_name_fails_clearly():
    with pytest.raises(BackboneUnavailable, match="unknown timm model"):
        create_backbone("no_such_network_v9")


def test_context_scales_add_a_block_on_the_primary_grid():
    from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor

    image = (np.random.default_rng(0).random((200, 320)) * 255).astype(np.uint8)
    single = PatchFeatureExtractor(FeatureConfig()).extract([image])[0]
    config = FeatureConfig(context_scales=(0.25,))
    assert config.block_dims == [128, 128] and config.primary_dims == 128
    both = PatchFeatureExtractor(config).extract([image])[0]
    assert both.grid == single.grid and both.input_shape == single.input_shape
    assert both.vectors.shape == (single.grid[0] * single.grid[1], 256)
    # the context block differs from the primary block: it saw the image at another scale
    assert not np.allclose(both.vectors[:, :128], both.vectors[:, 128:], atol=1e-3)
