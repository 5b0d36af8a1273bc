"""DeepFill v2 (Yu et al., *Free-Form Image Inpainting with Gated Convolution*, ICCV 2019) with
the official training settings (JiahuiYu/generative_inpainting master, inpaint.yml).

256x256 images; each hole is the union of a 128x128 box (each side shrunk by up to 16 px) and
1-3 free-form brush strokes (the official `bbox2mask` OR `brush_stroke_mask`); cnum 48 gated
generator; SN-PatchGAN critic (cnum 64) on [image, mask] with the hinge loss; one critic update
per generator update; Adam lr 1e-4, b1 0.5, b2 0.999 for both networks at a constant lr (the
official code's values; I have not found them restated in the paper's text, so they are the
code's, not a quoted figure); ae loss weight 1, gan loss weight 1. The experiment configs
import this one and change the data; on its own it trains on the bundled photos.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": "deepfill_v2", "cnum": 48, "critic_cnum": 64})
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "sample_photos", "num_examples": 4096, "crop_size": 256}
    c.data.image_size = 256
    c.data.mask = {
        "kind": "union",
        "parts": [
            {"kind": "box", "hole_size": [128, 128], "margin": [0, 0], "max_delta": [32, 32]},
            {"kind": "free_form"},  # brush_stroke_mask: 1-3 strokes, 4-11 vertices, width 12-40
        ],
    }
    c.batch_size = 16  # global: split over every device of every process
    c.total_steps = 1_000_000
    c.n_critic = 1  # D:G = 1:1
    c.learning_rate = 1e-4  # every network's, unless optimizer.<network>.lr is set
    adam = {"b1": 0.5, "b2": 0.999}
    c.optimizer = ml_collections.ConfigDict({"generator": dict(adam), "critic": dict(adam)})
    c.loss = ml_collections.ConfigDict(
        {
            "l1_loss_alpha": 1.0,  # ae loss = alpha * (mean|gt - x1| + mean|gt - x2|)
            "gan_loss_alpha": 1.0,  # hinge generator loss weight
            "gan_with_mask": True,  # the critic sees the mask as a 4th channel
            "ae_loss": True,
        }
    )
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 512
    c.eval_batch_size = 16
    c.best_metric = "eval_psnr"
    return c
