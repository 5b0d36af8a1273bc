"""Self-attention inpainting on Places2 (TFDS ``places365_small``, 256x256).

Generator: conv encoder 4 -> 64 -> 128 -> 256 (two stride-2 steps), full-width self-attention
at 64x64 (gamma starts at 0), transposed-conv decoder, tanh. Critic: PatchGAN convs on
[image, mask] with spectral norm. Losses: L1 on the hole and on the known pixels (weight 1
each) + 0.01 x hinge adversarial loss; one critic then one generator update per step. There
is no single paper for this model (a SAGAN-style attention block, Zhang et al. 2019, in an
encoder-decoder inpainter), so no paper recipe to follow: the optimizer is DeepFill v2's
(Yu et al., ICCV 2019, official code), Adam lr 1e-4, b1 0.5, b2 0.999, constant lr. Masks: a
mixture of DeepFill v1 boxes and free-form strokes.
    tfds build places365_small --file_format=array_record --data_dir=$DATA
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {"name": "sa_inpaint", "widths": (64, 128, 256), "attention": True, "critic_widths": (64, 128, 256, 512),
         "spectral_norm": True}
    )
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": "places365_small", "split": "train", "data_dir": None,
                     "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "places365_small", "split": "validation", "data_dir": None,
                          "file_format": "array_record"}
    c.data.image_size = 256
    c.data.mask = [[0.5, {"kind": "box", "hole_size": [128, 128], "margin": [0, 0], "max_delta": [32, 32]}],
                   [0.5, "free_form"]]
    c.batch_size = 16
    c.total_steps = 500_000
    c.n_critic = 1
    c.learning_rate = 1e-4
    adam = {"b1": 0.5, "b2": 0.999}
    c.optimizer = ml_collections.ConfigDict({"generator": dict(adam), "critic": dict(adam)})
    c.loss = ml_collections.ConfigDict({"l1_hole": 1.0, "l1_valid": 1.0, "adv": 0.01, "gan": "hinge"})
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 512
    c.eval_batch_size = 16
    c.best_metric = "eval_psnr"
    return c
