"""SAGAN, small and fast: 32x32 crops of the bundled sample photos, one class per photo.

Class-conditional with one class per scikit-image photo (label = photo index), ch 16 (64
channels per block), attention at 16x16; a few minutes on a 2-core CPU. Same model, losses
and engine as configs/sagan_imagenet128.py; only the sizes shrink (and the EMA is faster).
"""

import sagan_cifar10

from jattn.data.sources import SAMPLE_PHOTOS


def get_config():
    c = sagan_cifar10.get_config()
    c.model.update({"ch": 16, "num_classes": len(SAMPLE_PHOTOS), "ema_decay": 0.99})
    c.data.source = {"kind": "sample_photos", "num_examples": 512, "crop_size": 32, "scale_range": [4.0, 8.0]}
    c.data.eval_source = None  # the training source, in order
    c.data.image_size = 32
    c.batch_size = 16
    c.total_steps = 300
    c.log_every = 10
    c.image_every = 100
    c.checkpoint_every = 100
    c.eval_every = 300
    c.eval_images = 64
    c.eval_batch_size = 16
    return c
