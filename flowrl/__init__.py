"""flowrl: FlowRL (arXiv 2509.15207) post-training for reasoning language models.

Layout, from the math outwards: ``objectives`` (pure loss functions), ``partition`` (the log Z head),
``policy`` / ``rollout`` / ``rewards`` / ``data`` (moving parts), ``trainer`` (the one loop),
``evaluation``, ``export``, the ``toy`` experiment and the ``demo``'s pieces. The ``flowrl`` command is
``commands`` (one module per subcommand: flags, console output, exit status); the library never imports
it. Third-party engines live in ``integrations`` and are never imported by the core.
"""

__version__ = "0.1.0"
