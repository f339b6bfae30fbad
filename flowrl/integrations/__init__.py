"""Adapters that run FlowRL inside third-party training engines.

Each adapter is a thin layer over the same pieces as the project's own trainer: the loss from
:mod:`flowrl.objectives`, the partition head from :mod:`flowrl.partition` and the head's file format
from :mod:`flowrl.checkpoint`. The core never imports this package, and importing this package imports
no engine: each submodule needs its engine's optional dependency.

* :mod:`flowrl.integrations.trl`: ``FlowRLTrainer``, a subclass of TRL's ``GRPOTrainer``
  (``pip install "flowrl[trl]"``; see ``docs/trl.md``).
* :mod:`flowrl.integrations.verl`: FlowRL on verl 0.9's engine API (``pip install "flowrl[verl]"`` in
  its own environment; see ``docs/verl.md``).
"""
