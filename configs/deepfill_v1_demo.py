"""DeepFill v1, small and fast: the embedded default run on the bundled sample photos.

64x64 crops of scikit-image's photos, one box hole per image, cnum 16: about two minutes on a
laptop CPU. Same model, losses and engine as the full configs; only the sizes shrink.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        {"name": "deepfill_v1", "cnum": 16, "critic_cnum": 16, "local_size": 32, "ca_block_size": None}
    )
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "sample_photos", "num_examples": 512, "crop_size": 64}
    c.data.image_size = 64
    c.data.mask = {"kind": "box", "hole_size": [32, 32], "margin": [4, 4], "max_delta": [8, 8]}
    c.data.shuffle_buffer = None
    c.data.worker_count = 0
    c.batch_size = 8  # global, split over every device of every process
    c.total_steps = 40
    c.n_critic = 5
    c.compute_dtype = "float32"
    adam = {"lr": 1e-4, "b1": 0.5, "b2": 0.9, "clip_norm": None, "schedule": "constant", "warmup_steps": 0}
    c.optimizer = ml_collections.ConfigDict({"generator": dict(adam), "critic": dict(adam)})
    c.loss = ml_collections.ConfigDict(
        {
            "l1_alpha": 1.2,
            "l1_loss_alpha": 1.2,
            "ae_loss_alpha": 1.2,
            "gan_loss_alpha": 0.001,
            "wgan_gp_lambda": 10.0,
            "global_wgan_loss_alpha": 1.0,
            "gamma": 0.9,
        }
    )
    c.log_every = 5
    c.image_every = 20
    c.checkpoint_every = 20
    c.eval_every = 20
    c.eval_images = 16
    c.eval_batch_size = 8
    c.keep_checkpoints = 3
    c.best_metric = "eval_psnr"  # the best checkpoint is kept beside the latest ones
    c.best_mode = "max"
    c.skip_nonfinite = False
    return c
