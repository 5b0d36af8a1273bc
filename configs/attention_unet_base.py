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
    c.model = ml_collections.ConfigDict({"name": "attention_unet", "num_classes": 4, "base": 64, "depth": 5})
    c.data = ml_collections.ConfigDict()
    folder = {"kind": "folder", "root": "data/segmentation/images", "segmentation_root": "data/segmentation/masks"}
    c.data.source = {**folder, "split": "train"}
    c.data.eval_source = {**folder, "split": "val"}
    c.data.image_size = 256
    c.batch_size = 8
    c.total_steps = 100_000
    c.learning_rate = 1e-4  # Adam (0.9, 0.999)
    c.loss = ml_collections.ConfigDict({"dice_weight": 1.0, "dice_smooth": 1.0})
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 256
    c.eval_batch_size = 8
    c.best_metric = "eval_mean_dice"
    return c
