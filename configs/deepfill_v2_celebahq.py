"""DeepFill v2 on CelebA-HQ at 256x256 (TFDS `celeb_a_hq/256`, built from a manual download).

CelebA-HQ is not downloadable automatically: place the files TFDS asks for in a folder and
    tfds build celeb_a_hq/256 --manual_dir=$MANUAL --file_format=array_record --data_dir=$DATA
Or point data.source at an image folder: {"kind": "folder", "root": ..., "split": "train"}.
"""

import deepfill_v2_base


def get_config():
    c = deepfill_v2_base.get_config()
    c.data.source = {"kind": "tfds", "name": "celeb_a_hq/256", "split": "train", "data_dir": None,
                     "manual_dir": None, "file_format": "array_record"}
    c.data.eval_source = None  # the dataset has one split: evaluate on its first images
    c.eval_images = 256
    return c
