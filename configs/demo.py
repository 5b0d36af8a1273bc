"""DeepFill v1, small and fast: the embedded default run on the bundled sample photos.

64x64 crops of scikit-image's photos, one box hole per image, cnum 16: about two minutes on a
laptop CPU. Same model, losses and engine as the full configs; only the sizes shrink.
"""

import deepfill_v1_base


def get_config():
    c = deepfill_v1_base.get_config()
    c.model.update({"cnum": 16, "critic_cnum": 16, "local_size": 32})
    c.data.source = {"kind": "sample_photos", "num_examples": 512, "crop_size": 64}
    c.data.image_size = 64
    c.data.mask = {"kind": "box", "hole_size": [32, 32], "margin": [4, 4], "max_delta": [8, 8]}
    c.batch_size = 8
    c.total_steps = 40
    c.log_every = 5
    c.image_every = 20
    c.checkpoint_every = 20
    c.eval_every = 20
    c.eval_images = 16
    c.eval_batch_size = 8
    return c
