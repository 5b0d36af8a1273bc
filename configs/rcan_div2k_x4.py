"""RCAN x4 on DIV2K (Zhang et al., ECCV 2018; the paper's settings, optimizer included: Adam
(0.9, 0.999, eps 1e-8), lr 1e-4 halved every 2x10^5 iterations; see rcan_div2k_x2.py, also for
the flips and 90 degree rotations of the patches): 192x192 high-res crops, 48x48 low-res patches, two x2
pixel-shuffle steps, 15,592,355 trainable parameters (15,592,379 in the
official PyTorch count, which includes its two fixed MeanShift 1x1 convs).
    tfds build div2k/bicubic_x4 --file_format=array_record --data_dir=$DATA
"""

import rcan_div2k_x2


def get_config():
    return rcan_div2k_x2.rcan_config(4)
