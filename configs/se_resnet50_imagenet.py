"""SE-ResNet-50 on ImageNet (TFDS ``imagenet2012``, 224x224), after Hu et al. 2018.

28,088,024 parameters (the paper's 28.09 M). The paper trains 100 epochs with SGD (momentum
0.9, batch 1024, lr 0.6 divided by 10 every 30 epochs), random-size crops and flips. jattn's
optimizer is Adam only for now, so this config uses Adam with a cosine decay over the run
(an SGD / weight-decay / step-schedule option is requested from the engine); augmentation
beyond the loader's random crops is the data pipeline's.

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
    c.data.worker_count = 8
    c.batch_size = 256
    c.total_steps = 500_000  # 100 epochs of 1.28 M images at batch 256
    c.compute_dtype = "bfloat16"
    c.learning_rate = 1e-3
    c.optimizer = ml_collections.ConfigDict(
        {"schedule": "cosine", "decay_steps": 495_000, "warmup_steps": 5000}
    )
    c.log_every = 100
    c.image_every = 0  # no picture to show for a classifier
    c.checkpoint_every = 10000
    c.eval_every = 10000
    c.eval_images = 10240
    c.eval_batch_size = 256
    c.best_metric = "eval_accuracy"
    return c
