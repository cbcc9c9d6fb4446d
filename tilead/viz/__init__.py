"""Pictures and pages for people: overlays and the evaluation report (torch-free).

* :mod:`~tilead.viz.overlays`: overlay pictures (image, heatmap, outlines, colour bar,
  legend, score and threshold), drawn with NumPy and Pillow only, so they look the same
  whichever OpenCV is installed (and without one).
* :mod:`~tilead.viz.report`: the self-contained HTML page ``tilead eval --report`` writes
  (plots with matplotlib, images embedded as base64).
"""
