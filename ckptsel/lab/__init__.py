"""The lab: tiny models trained here from scratch, with known ground truth.

Used by ``ckptsel demo``, by the end-to-end tests, and to validate every metric: for each
checkpoint of a lab run the true held-out accuracy and held-out reference NLL are known.

In pipeline order:

``tokenizer``     character-level tokenizer (BOS/EOS/pad), saved with every checkpoint
``tasks``         task families whose questions have several valid reasoning traces
                  (and ``modadd``, a+b mod 23, for grokking: ``recipes/lab/grokking.yaml``)
``splits``        seeded train / held-out test splits in GSM8K layout
``models``        a tiny dense Llama and a tiny OLMoE (4 experts, top-2)
``train``         one run through transformers' Trainer (full or LoRA, from scratch or a base)
``ground_truth``  per-checkpoint held-out accuracy, NLL, perturbation accuracy -> ground_truth.json
``grid``          YAML grid recipes (``recipes/lab/*.yaml``) expanded into runs
``runner``        resumable, parallel execution of a grid
``summary``       did memorisation and over-memorization happen? (pure functions)
``quick``         :func:`~ckptsel.lab.quick.train_tiny_run`, a run in seconds for test fixtures
"""
