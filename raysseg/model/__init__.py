"""AuxSegNet: backbones, heads, task and cross-task affinity (pure torch; no Ray)."""

from raysseg.model.affinity import AffinityState, CrossTaskAffinity, TaskAffinity
from raysseg.model.backbone import Backbone
from raysseg.model.builder import build_backbone
from raysseg.model.network import AuxSegNet, AuxSegOutputs, build_model, build_model_from_args
from raysseg.model.weights import load_backbone_weights

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
