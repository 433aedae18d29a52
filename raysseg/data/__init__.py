"""Data: one `Record` type and class names (records), the dataset sources VOC / COCO / folder
(sources) and their image-label tables (label_files), the Parquet manifest format (manifest), image
codecs (io; files themselves are `raysseg.storage`'s), augmentation (transforms), the stage Dataset
(dataset) and dataset generators (synth, composite).

Import the submodules directly: this package `__init__` imports nothing, so reading a manifest
or a label PNG does not pull in torch.
"""
