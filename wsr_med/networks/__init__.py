"""Wise-SrNet and comparison heads on MONAI backbones."""

from wsr_med.networks.backbones import BACKBONES, backbone_label, DenseNetFeatures, EfficientNetFeatures, build_backbone
from wsr_med.networks.batchnorm import warm_start_batchnorm
from wsr_med.networks.constraints import attach_constraints, project_constraints_
from wsr_med.networks.diagnostics import (HeadEvidence, gradcam, gradcam_layer, logits_with_shuffled_positions,
                                         shuffle_positions, strongest_point, to_source_pixels)
from wsr_med.networks.heads import (
    HEADS,
    AvgMaxPool,
    CatAvgMaxPool,
    ClassificationHead,
    FlattenAll,
    GeneralizedMeanPool,
    GlobalPool,
    WiseCompression,
    WiseSrNetHead,
    build_compression,
    default_pre_pool,
)
from wsr_med.networks.pretrained import IMAGENET_WEIGHTS, imagenet_weights_file, optimizer_param_groups, resolve_pretrained_weights
from wsr_med.networks.wise_srnet import ImageTooSmall, WiseSrNet, feature_size, load_pretrained_weights, read_state_dict
