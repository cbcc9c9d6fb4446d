"""Serving a bundle over HTTP on Ray Serve (optional extra ``tilead[ray]``).

:mod:`tilead.serve.codec` (request bodies to images, results to JSON) needs
only the base install; :mod:`tilead.serve.app` (the deployment) needs
``ray[serve]``. Neither imports torch or the trainer.
"""
