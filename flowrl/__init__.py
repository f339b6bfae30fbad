"""flowrl: FlowRL (arXiv 2509.15207) post-training for reasoning language models.

Layout, from the math outwards: ``objectives`` (pure loss functions), ``partition`` (the log Z head),
``policy`` / ``rollout`` / ``rewards`` / ``data`` (moving parts), ``trainer`` (the one loop),
``evaluation``, then the entry points (``cli``, ``demo``, ``toy``). Third-party engines live in
``integrations`` and are never imported by the core.
"""

__version__ = "0.1.0"
