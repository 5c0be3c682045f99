"""ckptsel: choose, flag and merge fine-tuning checkpoints from the training data alone.

The package reads in pipeline order:

    discover -> data (+ graders) -> measure -> store -> metrics -> select -> merge -> verify -> report

``ckptsel.cli`` sits on top and is the only layer that prints.
"""

__version__ = "0.1.0.dev0"
