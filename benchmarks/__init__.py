"""llama_ext benchmark suite: ``python -m benchmarks`` (``make bench``); see ``--help``."""
