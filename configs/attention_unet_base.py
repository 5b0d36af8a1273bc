"""Attention U-Net (Oktay et al. 2018, 2-D) on a folder of images with per-pixel class masks.

Widths 64 / 128 / 256 / 512 / 1024 (31.6 M parameters at 4 classes), attention gates on the
four skips, batch norm; 256x256 crops; loss: per-pixel cross-entropy + soft Dice (the paper
trains with a Dice loss); Adam.

Folder layout (``jattn.data.sources.FolderSource`` with ``segmentation_root``)::

    IMAGES/<any/relative/path>/<id>.png|jpg     the images (searched recursively)
    MASKS/<any/relative/path>/<id>.png          one map per image at the same relative path,
                                                8-bit single channel (or palette) PNG, pixel
                                                value = class (0 = background, 1..K-1)

The train / val split is a stable hash of each image's relative path (``val_fraction``
of the files, 5 % by default). Set ``data.source.root`` / ``segmentation_root`` (and the
eval source's) to IMAGES / MASKS and model.num_classes to K, background included.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        {"name": "attention_unet", "num_classes": 4, "base": 64, "depth": 5, "features": None, "attention": True}
    )
    c.data = ml_collections.ConfigDict()
    folder = {"kind": "folder", "root": "data/segmentation/images", "segmentation_root": "data/segmentation/masks"}
    c.data.source = {**folder, "split": "train"}
    c.data.eval_source = {**folder, "split": "val"}
    c.data.loader = "grain"
    c.data.image_size = 256
    c.data.mask = None
    c.data.eval_mask = None
    c.data.shuffle_buffer = None
    c.data.worker_count = 0
    c.batch_size = 8
    c.total_steps = 100_000
    c.compute_dtype = "float32"
    c.learning_rate = 1e-4
    c.optimizer = ml_collections.ConfigDict(
        {"lr": None, "b1": 0.9, "b2": 0.999, "clip_norm": None, "schedule": "constant", "warmup_steps": 0}
    )
    c.loss = ml_collections.ConfigDict({"dice_weight": 1.0, "dice_smooth": 1.0})
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 256
    c.eval_batch_size = 8
    c.keep_checkpoints = 3
    c.best_metric = "eval_mean_dice"
    c.best_mode = "max"
    c.skip_nonfinite = False
    return c
