"""Export (PyTorch + ONNX): a training run to a self-describing bundle.

Not implemented yet: the ONNX bundle is issue #4 and TensorRT engines issue #5.
"""
