"""The built-in demo: a deterministic synthetic inspection dataset and a run of the runtime on it."""
