"""STFPM: its config section (``config``), its math (``model``) and its detector adapter (``detector``).

The package imports nothing itself: ``config`` is torch-free (the run config loads it), ``detector`` and
``model`` need torch.
"""
