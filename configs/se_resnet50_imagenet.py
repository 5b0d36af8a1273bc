"""SE-ResNet-50 on ImageNet (TFDS ``imagenet2012``, 224x224), with the recipe of Hu et al.,
*Squeeze-and-Excitation Networks*, CVPR 2018 (section "Implementation").

28,088,024 parameters (the paper's 28.09 M). The paper trains 100 epochs from scratch with
synchronous SGD, momentum 0.9, batch 1024, lr 0.6 divided by 10 every 30 epochs, random-size
crops and horizontal flips. This config runs batch 256, so the lr is scaled linearly to
0.6 x 256 / 1024 = 0.15 (the linear scaling rule of Goyal et al. 2017; no warm-up, as in the
paper); the divisions by 10 come at epochs 30, 60 and 90 of 5005 steps (1,281,167 images /
256, rounded up), 100 epochs in all. Weight decay 1e-4 on every parameter, the L2 of classic
SGD: the ResNet value (He et al. 2016); the SENet paper's text, as far as I know, does not
state its weight decay, so 1e-4 is the standard assumption, not a quoted figure.

Augmentation (Szegedy et al.'s, which the paper follows): random-size crops, 8% to 100% of
the image's area with aspect ratio in [3/4, 4/3], resized to 224x224 (``data.augment.crop =
"inception"``, torchvision's RandomResizedCrop), and left-right flips. Evaluation: the
shorter side resized to 256, then the centre 224x224 crop (``data.eval_resize_shorter``).

ImageNet must be downloaded by hand (manual_dir) and prepared once:
    tfds build imagenet2012 --manual_dir=$IMAGENET_TARS --file_format=array_record --data_dir=$DATA
then `jattn train --config configs/se_resnet50_imagenet.py --workdir ... --set data.source.data_dir=$DATA`.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {"name": "se_resnet", "preset": "se_resnet50", "num_classes": 1000, "reduction": 16}
    )
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": None,
                     "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "imagenet2012", "split": "validation", "data_dir": None,
                          "file_format": "array_record"}
    c.data.image_size = 224
    c.data.augment = {"crop": "inception", "area": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "flip_lr": True}
    c.data.eval_resize_shorter = 256  # then the centre 224 crop
    c.data.worker_count = 8
    c.batch_size = 256
    steps_per_epoch = 5005  # ceil(1,281,167 / 256)
    c.total_steps = 100 * steps_per_epoch
    c.compute_dtype = "bfloat16"
    c.learning_rate = 0.6 * c.batch_size / 1024  # the paper's 0.6 at batch 1024, scaled linearly
    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "decay_mask": "all",
        "schedule": "step", "boundaries_epochs": [30, 60, 90], "steps_per_epoch": steps_per_epoch, "factor": 0.1,
    })
    c.log_every = 100
    c.image_every = 0  # no picture to show for a classifier
    c.checkpoint_every = 10000
    c.eval_every = 10000
    c.eval_images = 10240
    c.eval_batch_size = 256
    c.best_metric = "eval_accuracy"
    return c
