"""SE-ResNet-20 on CIFAR-10 (TFDS ``cifar10``, 32x32): the CIFAR ResNet-20 layout of He et al.
2016 (3x3 stem, three stages of three basic blocks, widths 16 / 32 / 64) with an SE gate
(reduction 16) in every block; 274,847 parameters.

He et al. train 64k iterations at batch 128 with SGD; jattn's optimizer is Adam (cosine
decay here) until the engine offers SGD. Prepare once:
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
    c.batch_size = 128
    c.total_steps = 64_000
    c.learning_rate = 1e-3
    c.optimizer = ml_collections.ConfigDict(
        {"schedule": "cosine", "decay_steps": 64_000}
    )
    c.log_every = 100
    c.image_every = 0
    c.checkpoint_every = 4000
    c.eval_every = 4000
    c.eval_images = 10000
    c.eval_batch_size = 500
    c.best_metric = "eval_accuracy"
    return c
