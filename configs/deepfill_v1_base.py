"""DeepFill v1 (Yu et al., *Generative Image Inpainting with Contextual Attention*, CVPR 2018)
with the official training settings (JiahuiYu/generative_inpainting v1.0.0, inpaint.yml).

256x256 images, one 128x128 box hole per image (each side shrunk by up to 16 px), cnum 32,
WGAN-GP local (128x128 crop around each image's hole) and global critics, 5 critic updates
per generator update, Adam lr 1e-4, b1 0.5, b2 0.9 for both networks at a constant lr (the
paper's and the official code's), loss weights of the paper. The experiment configs import
this one and change the data; on its own it trains on the bundled photos.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": "deepfill_v1", "cnum": 32, "critic_cnum": 64, "local_size": 128})
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "sample_photos", "num_examples": 4096, "crop_size": 256}
    c.data.image_size = 256
    c.data.mask = {"kind": "box", "hole_size": [128, 128], "margin": [0, 0], "max_delta": [32, 32]}
    c.batch_size = 16  # global: split over every device of every process
    c.total_steps = 1_000_000
    c.n_critic = 5
    c.learning_rate = 1e-4  # every network's, unless optimizer.<network>.lr is set
    adam = {"b1": 0.5, "b2": 0.9}
    c.optimizer = ml_collections.ConfigDict({"generator": dict(adam), "critic": dict(adam)})
    # loss: the official weights are the task's defaults (jattn/train/tasks/deepfill_v1.py)
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 512
    c.eval_batch_size = 16
    c.best_metric = "eval_psnr"
    return c
