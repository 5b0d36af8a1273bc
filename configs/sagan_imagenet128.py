"""SAGAN on ImageNet at 128x128 with the paper's settings (Zhang et al., *Self-Attention
Generative Adversarial Networks*, ICML 2019, section 5).

Class-conditional (1000 classes: conditional batch norm in G, projection D), ch = 64, z 128,
self-attention at the 32x32 features of both networks (the paper's best), spectral norm in G
and D, hinge loss, TTUR (G 1e-4, D 4e-4, Adam b1 0, b2 0.9, constant lr), one D update per G
update, batch 256, EMA of G's weights (0.9999). G + D: 81.5M parameters (BigGAN's SA-GAN baseline).

ImageNet is not downloadable automatically: place the ILSVRC2012 tars where TFDS asks, then
    tfds build imagenet2012 --manual_dir=$MANUAL --file_format=array_record --data_dir=$DATA
IS / FID need the FID Inception weights (never downloaded; see jattn.gan_metrics):
    jattn train ... model.inception_weights=/path/fid_inception.npz best_metric=eval_fid
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            "name": "sagan",
            "ch": 64,
            "z_dim": 128,
            "num_classes": 1000,
            "attention_resolution": 32,
            "ema_decay": 0.9999,
        }
    )
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": None,
                     "manual_dir": None, "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "imagenet2012", "split": "validation", "data_dir": None,
                          "manual_dir": None, "file_format": "array_record"}
    c.data.image_size = 128
    c.batch_size = 256  # global: split over every device of every process
    c.total_steps = 1_000_000
    c.n_critic = 1
    adam = {"b1": 0.0, "b2": 0.9}  # TTUR: each network has its own lr
    c.optimizer = ml_collections.ConfigDict(
        {"generator": {"lr": 1e-4, **adam}, "critic": {"lr": 4e-4, **adam}}
    )
    c.loss = ml_collections.ConfigDict({"kind": "hinge"})
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 50_000
    c.eval_images = 50_000  # FID-50k against the validation set
    c.eval_batch_size = 400
    c.best_mode = "min"  # for best_metric "eval_fid", once model.inception_weights is set
    return c
