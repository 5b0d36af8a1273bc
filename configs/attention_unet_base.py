"""Attention U-Net (Oktay et al., *Attention U-Net: Learning Where to Look for the Pancreas*,
MIDL 2018; here 2-D) on a folder of images with per-pixel class masks.

Widths 64 / 128 / 256 / 512 / 1024 (31.6 M parameters at 4 classes), attention gates on the
four skips, batch norm; 256x256 crops; loss: per-pixel cross-entropy + soft Dice (the paper
trains with a Dice loss). Optimizer: the paper trains with Adam but, as far as I know, its
text gives no learning rate; the authors' code (ozan-oktay/Attention-Gated-Networks, CT
configs such as configs/config_unet_ct_multi_att_dsv.json) sets lr 1e-4 and an L2 weight of
1e-6, which its optimizer factory passes to PyTorch as weight_decay (L2 added to the
gradient). So: Adam (0.9, 0.999), lr 1e-4, L2 weight decay 1e-6 on every parameter,
constant lr (those configs also name a "step" lr policy whose factor they do not give, so it
is left out: an assumption, not the paper's figure). Batch 8 of 2-D crops, not the paper's
2 3-D volumes.

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
    c.learning_rate = 1e-4
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "b1": 0.9, "b2": 0.999, "weight_decay": 1e-6})
    c.loss = ml_collections.ConfigDict({"dice_weight": 1.0, "dice_smooth": 1.0})
    c.log_every = 100
    c.image_every = 1000
    c.checkpoint_every = 5000
    c.eval_every = 5000
    c.eval_images = 256
    c.eval_batch_size = 8
    c.best_metric = "eval_mean_dice"
    return c
