"""DeepFill v2 on Places2 (TFDS `places365_small`, 256x256), the paper's main setting.

Prepare the dataset once as array_record so grain can read it with random access:
    tfds build places365_small --file_format=array_record --data_dir=$DATA
then `jattn train --config configs/deepfill_v2_places2.py --workdir ... --set data.source.data_dir=$DATA`
(data_dir may be a gs:// path). Validation images are the evaluation set.
"""

import deepfill_v2_base


def get_config():
    c = deepfill_v2_base.get_config()
    c.data.source = {"kind": "tfds", "name": "places365_small", "split": "train", "data_dir": None,
                     "file_format": "array_record"}
    c.data.eval_source = {"kind": "tfds", "name": "places365_small", "split": "validation", "data_dir": None,
                          "file_format": "array_record"}
    return c
