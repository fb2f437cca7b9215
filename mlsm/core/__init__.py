"""The base layer: what the pipeline stages and the trainer share (errors, files, devices, ranks, the model).

It imports nothing from mlsm.pipeline, mlsm.trainer or mlsm.cli; see docs/ARCHITECTURE.md.
"""
