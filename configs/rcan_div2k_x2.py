"""RCAN x2 on DIV2K with the paper's training settings (Zhang et al., *Image Super-Resolution
Using Very Deep Residual Channel Attention Networks*, ECCV 2018, section 4.1; RCAN_TrainCode).

10 residual groups x 20 RCABs, 64 features, reduction 16; batch 16 of 48x48 low-res patches
(96x96 high-res crops, ``data.image_size = 48 * scale``); L1 loss; Adam b1 0.9, b2 0.999,
eps 1e-8; lr 1e-4 halved every 2x10^5 iterations (a step schedule at 200k, 400k, 600k, 800k);
10^6 iterations (1000 epochs of 1000). Augmentation: the paper's random 90, 180, 270 degree
rotations and horizontal flips, as the EDSR / BasicSR code does them (left-right flip,
up-down flip, rotation; ``data.augment``), so each of the 8 orientations of a patch is
equally likely. They transform the high-res crop before the low-res input is made from it
(the "lowres" field is the bicubic downscale of the augmented crop), so the pair stays
consistent.

Data: the high-res DIV2K images (TFDS ``div2k/bicubic_x2``, feature ``hr``); jattn builds the
low-res input itself by bicubic downscaling by ``data.scale`` (the "lowres" field), so any
``div2k/*`` config's ``hr`` images serve. Prepare once as array_record for grain:
    tfds build div2k/bicubic_x2 --file_format=array_record --data_dir=$DATA
then `jattn train --config configs/rcan_div2k_x2.py --workdir ... --set data.source.data_dir=$DATA`.
Evaluation: the 100 DIV2K validation images (crops of ``data.image_size``), Y-channel PSNR /
SSIM with ``scale`` pixels shaved, against the bicubic baseline (eval_bicubic_*).
"""

import ml_collections


def rcan_config(scale: int) -> ml_collections.ConfigDict:
    """The paper's RCAN settings for ``scale`` (2, 3, 4, 8) on DIV2K."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {"name": "rcan", "n_resgroups": 10, "n_resblocks": 20, "n_feats": 64, "reduction": 16,
         "non_local": False, "res_scale": 1.0}
    )
    tfds_name = f"div2k/bicubic_x{scale}"
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": tfds_name, "split": "train", "image_key": "hr", "data_dir": None,
                     "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": tfds_name, "split": "validation", "image_key": "hr",
                          "data_dir": None, "file_format": "array_record"}
    c.data.image_size = 48 * scale  # high-res crop; the low-res patch is 48x48
    c.data.scale = scale
    c.data.augment = {"crop": "random", "flip_lr": True, "flip_ud": True, "rot90": True}
    c.batch_size = 16
    c.total_steps = 1_000_000
    c.learning_rate = 1e-4
    c.optimizer = ml_collections.ConfigDict({
        "name": "adam", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "schedule": "step", "boundaries": [200_000, 400_000, 600_000, 800_000], "factor": 0.5,
    })
    c.log_every = 100
    c.image_every = 5000
    c.checkpoint_every = 10000
    c.eval_every = 10000
    c.eval_images = 96  # 100 validation images, whole batches of 16
    c.eval_batch_size = 16
    c.best_metric = "eval_psnr_y"
    return c


def get_config():
    return rcan_config(2)
