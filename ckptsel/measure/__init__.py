"""Measurement engine: what one loaded checkpoint says about the training examples.

In pipeline order:

``loading``   load each checkpoint once; LoRA adapters hot-swapped on one base model
``scoring``   teacher-forced target NLL and predictive entropy, batched by length
``routers``   MoE routing weights read off the scoring pass (for ``ckptsel.pathways``)
``sampling``  seeded k-sample decoding that does not depend on batch composition; copy rate
``context``   :class:`~ckptsel.measure.context.MeasureContext`, what a measurement kind uses beside the model

These modules (``context`` and ``text`` aside) import torch at the top; the CLI imports them
inside its command functions.
"""
