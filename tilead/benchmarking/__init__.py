"""``tilead-bench``'s parts: latency statistics, the timed loop, environment facts and the report.

Nothing here imports torch unless ``--compare torch`` asks for the trainer's
eager ensemble (:mod:`tilead.benchmarking.targets`).
"""
