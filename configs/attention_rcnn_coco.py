"""Attention R-CNN on COCO 2017 (TFDS ``coco/2017``): Faster R-CNN with an SE-ResNet-50 FPN
backbone and the class-embedding attention over proposals, with the usual COCO "1x" recipe.

The recipe of Detectron / torchvision's reference for ``fasterrcnn_resnet50_fpn``: 90,000
updates at batch 16 (about 12 epochs of the 118k training images), synchronous SGD with
momentum 0.9, lr 0.02 (0.02 at batch 16, the linear scaling rule of Goyal et al. 2017 for
other batches), multiplied by 0.1 at updates 60,000 and 80,000, weight decay 1e-4 on every
parameter, a linear warm-up over the first 1000 updates (here from 0; Detectron starts at
lr / 1000). Images: the longer side fits 1024 px, aspect preserved, padded bottom / right to
1024x1024 (torchvision resizes the shorter side to 800 with the longer at most 1333: one
static shape per run instead), left-right flips in training. The model's numbers are
torchvision's (2000 / 1000 proposals, 512 RoIs per image with 25% foreground, 100
detections per image). Trained from scratch: converted ImageNet weights can be loaded into
``params/model/backbone`` (frozen batch norm, ``model.frozen_bn``, is then the usual
choice at 2 images per device).

COCO must be prepared once with tensorflow-datasets, e.g.
    tfds build coco/2017 --data_dir=$DATA
then `jattn train --config attention_rcnn_coco --workdir ... --set data.source.data_dir=$DATA
--set data.eval_source.data_dir=$DATA`. A COCO folder (``annotations.json`` and the images)
works too: ``data.source = {"kind": "coco", "root": ".../train2017", "annotations":
".../instances_train2017.json", "images": "."}``. Evaluation: COCO's box AP on the first
5000 validation images (all of val2017), pycocotools.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": "attention_rcnn", "preset": "resnet50_fpn", "num_classes": 80,
                                         "attention_score": "dot"})
    c.loss = ml_collections.ConfigDict({"box_loss": "smooth_l1"})
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": "coco/2017", "split": "train", "data_dir": None}
    c.data.eval_source = {"kind": "tfds", "name": "coco/2017", "split": "validation", "data_dir": None}
    c.data.image_size = 1024
    c.data.max_boxes = 100
    c.data.augment = {"flip_lr": True}
    c.data.worker_count = 8
    c.batch_size = 16
    c.total_steps = 90_000
    c.compute_dtype = "bfloat16"
    c.learning_rate = 0.02 * c.batch_size / 16
    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "decay_mask": "all",
        "schedule": "step", "boundaries": [60_000, 80_000], "factor": 0.1, "warmup_steps": 1000,
    })
    c.log_every = 100
    c.image_every = 5000
    c.checkpoint_every = 5000
    c.eval_every = 10_000
    c.eval_images = 5000
    c.eval_batch_size = 8
    c.best_metric = "eval_map"
    return c
