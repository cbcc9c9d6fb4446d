"""Training (PyTorch): one anomaly model per tile location.

Not implemented yet: the PaDiM trainer is issue #3. It will import
``tilead.runtime`` for the tile geometry and the post-processing kernels, so
that validation runs exactly what the Predictor runs.
"""
