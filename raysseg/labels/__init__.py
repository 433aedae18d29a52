"""Pseudo labels: CAMs, CAM + saliency fusion, dense CRF, offline saliency, the per-image update
and the finishing of one image of a label update (finish).

Import submodules explicitly (`from raysseg.labels.fusion import fuse_labels`): using one of them
then does not load the CRF library, OpenCV or onnxruntime needed by the others.
"""
