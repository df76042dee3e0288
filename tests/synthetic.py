"""Synthetic nominal textures with a planted defect, shared by the detector tests."""
import numpy as np

SIDE = 128
BLOB_CENTRE, BLOB_RADIUS = (84, 44), 16


def stripes(rng: np.random.Generator) -> np.ndarray:
    """Grey vertical stripes (period 8 px, random phase) with a little noise, uint8."""
    y, x = np.mgrid[:SIDE, :SIDE]
    image = 0.5 + 0.2 * np.sin(2 * np.pi * x / 8 + rng.uniform(0, 2 * np.pi)) + 0.03 * rng.normal(size=(SIDE, SIDE))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def blob_mask() -> np.ndarray:
    y, x = np.mgrid[:SIDE, :SIDE]
    return (y - BLOB_CENTRE[0]) ** 2 + (x - BLOB_CENTRE[1]) ** 2 <= BLOB_RADIUS ** 2


def stripe_scene(extractor, train_images: int = 12, clean_images: int = 4, seed: int = 0):
    """(train features, clean test features, features of a stripe image with a bright blob)."""
    rng = np.random.default_rng(seed)
    train = extractor.extract([stripes(rng) for _ in range(train_images)])
    clean = extractor.extract([stripes(rng) for _ in range(clean_images)])
    blob = stripes(rng)
    blob[blob_mask()] = 255
    (blob_features,) = extractor.extract([blob])
    return train, clean, blob_features
