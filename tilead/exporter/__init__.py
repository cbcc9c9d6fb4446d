"""Export (PyTorch + ONNX): a training run to a self-describing bundle.

:func:`tilead.exporter.bundle.export_bundle` writes one ONNX model per tile
location (``onnx_export``), checked with ``onnx.checker`` and against the eager
model, hashed, with ``manifest.json``; atomically. TensorRT engines are issue #5.
"""
