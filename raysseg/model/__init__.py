"""AuxSegNet: backbones, heads, task and cross-task affinity (pure torch; no Ray)."""

from raysseg.model.affinity import AffinityState, CrossTaskAffinity, TaskAffinity
from raysseg.model.backbone import Backbone, build_backbone, load_backbone_weights
from raysseg.model.network import AuxSegNet, AuxSegOutputs, build_model, build_model_from_args

__all__ = [
    "AffinityState",
    "AuxSegNet",
    "AuxSegOutputs",
    "Backbone",
    "CrossTaskAffinity",
    "TaskAffinity",
    "build_backbone",
    "build_model",
    "build_model_from_args",
    "load_backbone_weights",
]
