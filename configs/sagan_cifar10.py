"""SAGAN on CIFAR-10 at 32x32: class-conditional (10 classes), BigGAN's CIFAR widths.

Same model, losses and optimizer settings as configs/sagan_imagenet128.py, the paper's (Zhang
et al., *Self-Attention Generative Adversarial Networks*, ICML 2019: hinge loss, SN in G and
D, TTUR 1e-4 / 4e-4 with Adam betas 0 / 0.9, 1:1 updates; EMA), with the 32-pixel networks:
ch 64 gives 256 channels in every block (G: 4x4 -> three upsampling blocks; D: four blocks),
self-attention at the 16x16 features. G + D: 8.7M parameters. TFDS `cifar10` (prepared offline:
`tfds build cifar10 --file_format=array_record`), evaluated on its test split (FID-10k).
"""

import sagan_imagenet128


def get_config():
    c = sagan_imagenet128.get_config()
    c.model.update({"num_classes": 10, "attention_resolution": 16, "ema_decay": 0.9999})
    c.data.source = {"kind": "tfds", "name": "cifar10", "split": "train", "data_dir": None,
                     "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "cifar10", "split": "test", "data_dir": None,
                          "file_format": "array_record"}
    c.data.image_size = 32
    c.batch_size = 64
    c.total_steps = 200_000
    c.checkpoint_every = 5000
    c.eval_every = 10_000
    c.eval_images = 10_000
    c.eval_batch_size = 200
    return c
