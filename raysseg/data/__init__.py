"""Data: one `Record` type for every source (records), streaming readers and Parquet manifests,
I/O over local paths and URIs (io), augmentation (transforms), the stage Dataset (dataset) and a
synthetic dataset generator (synth).

Import the submodules directly: this package `__init__` imports nothing, so reading a manifest
or a label PNG does not pull in torch.
"""
