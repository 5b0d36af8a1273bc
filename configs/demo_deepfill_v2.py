"""DeepFill v2, small and fast: gated generator and SN-PatchGAN on the bundled sample photos.

64x64 crops of scikit-image's photos; each hole a 32x32 box united with thin brush strokes;
cnum 16 (of 48), critic cnum 16 (of 64): a few minutes on a laptop CPU. Same model, losses
and engine as the full configs; only the sizes shrink.
"""

import deepfill_v2_base


def get_config():
    c = deepfill_v2_base.get_config()
    c.model.update({"cnum": 16, "critic_cnum": 16})
    c.data.source = {"kind": "sample_photos", "num_examples": 512, "crop_size": 64}
    c.data.image_size = 64
    c.data.mask = {
        "kind": "union",
        "parts": [
            {"kind": "box", "hole_size": [32, 32], "margin": [4, 4], "max_delta": [8, 8]},
            {"kind": "free_form", "min_width": 3, "max_width": 10},
        ],
    }
    c.batch_size = 8
    c.total_steps = 40
    c.log_every = 5
    c.image_every = 20
    c.checkpoint_every = 20
    c.eval_every = 20
    c.eval_images = 16
    c.eval_batch_size = 8
    return c
