"""SE-ResNet-20 on CIFAR-10 (TFDS ``cifar10``, 32x32): the CIFAR ResNet-20 layout of He et al.
2016 (3x3 stem, three stages of three basic blocks, widths 16 / 32 / 64) with an SE gate
(reduction 16) in every block; 274,847 parameters.

The recipe is He et al.'s for CIFAR-10 (*Deep Residual Learning for Image Recognition*, CVPR
2016, section 4.2), which the CIFAR experiments of Hu et al. (*Squeeze-and-Excitation
Networks*, CVPR 2018 / TPAMI) build on: SGD, momentum 0.9, weight decay 1e-4 (L2, every
parameter), batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in all.
(The SENet paper's own CIFAR schedule is not restated here: I have not checked that it
differs from He et al.'s.) Augmentation, He et al.'s: 4 pixels of zero padding on each
side, a random 32x32 crop of the 40x40 result, a random left-right flip (``data.augment``;
the padding is black, as torchvision's ``RandomCrop(32, padding=4)``); evaluation uses the
32x32 test images as they are. Prepare once:
    tfds build cifar10 --file_format=array_record --data_dir=$DATA
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {"name": "se_resnet", "preset": "se_resnet_cifar", "depth": 20, "num_classes": 10, "reduction": 16}
    )
    c.data = ml_collections.ConfigDict()
    c.data.source = {"kind": "tfds", "name": "cifar10", "split": "train", "data_dir": None, "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "cifar10", "split": "test", "data_dir": None,
                          "file_format": "array_record"}
    c.data.image_size = 32
    c.data.augment = {"crop": "pad", "pad": 4, "pad_mode": "zero", "flip_lr": True}
    c.batch_size = 128
    c.total_steps = 64_000
    c.learning_rate = 0.1
    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "decay_mask": "all",
        "schedule": "step", "boundaries": [32_000, 48_000], "factor": 0.1,
    })
    c.log_every = 100
    c.image_every = 0
    c.checkpoint_every = 4000
    c.eval_every = 4000
    c.eval_images = 10000
    c.eval_batch_size = 500
    c.best_metric = "eval_accuracy"
    return c
