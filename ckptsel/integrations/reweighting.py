"""Memorization-aware reweighting during training, in the sampler (``CkptselCallback(reweight=...)``).

Ruan et al. (2025, arXiv 2508.04117) mitigate over-memorization by giving memorised training
examples less weight for the rest of fine-tuning. The Trainer callback already knows, at every
measured save, which of the measured examples are memorised (target NLL below ν, or samples
copying the target: the recipe's memorisation rule, ckptsel/DESIGN.md *Memorised*). With
``reweight=w`` it does exactly this:

* an example found memorised at a measured save keeps weight ``w`` (0 <= w < 1) for the rest of
  training; every other row of the training set keeps weight 1 (rows outside the measured subset
  are never down-weighted: nothing is known about them);
* the weights act in the **sampler**: from the first save that down-weights anything, the Trainer's
  training sampler is replaced by :class:`ReweightedSampler`, which draws an epoch's worth of
  indices (as many as the dataset has rows, so steps per epoch and the LR schedule are unchanged)
  *with replacement*, row i with probability weight_i / sum of weights, from its own generator seeded
  with the Trainer's data seed and the epoch (no global random state is touched). The epoch already
  under way finishes with the old order; the new weights apply from the next epoch;
* the training file's rows and the Trainer's dataset must be the same rows in the same order (a
  dataset built from that file, unpacked): the callback checks the row count and, when it differs,
  says so in one line and does not reweight;
* with reweighting off (the default) nothing is replaced: training is bit-identical to training
  without the callback.

Why the sampler and not the loss: a weighted loss needs the example's identity inside the loss,
which the collators of the Trainer and of TRL's SFTTrainer drop; the sampler is one object both
share, full and LoRA alike, and with weight 0 it is data removal.
"""

from __future__ import annotations

import numpy as np


class ReweightedSampler:
    """``len(weights)`` indices per epoch drawn with replacement in proportion to ``weights``, seeded per epoch.

    ``weights`` is read at the start of each epoch, so the callback updates it in place.
    ``set_epoch`` is what accelerate's data loader calls between epochs.
    """

    def __init__(self, weights: np.ndarray, seed: int):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        import torch

        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        weights = torch.as_tensor(self.weights, dtype=torch.float64)
        if not weights.sum() > 0:  # everything weighted 0: fall back to uniform rather than stop training
            weights = torch.ones_like(weights)
        yield from torch.multinomial(weights, len(weights), replacement=True, generator=generator).tolist()


def training_sampler_holder(dataloader):
    """The object whose ``sampler`` attribute the Trainer's training data loader draws indices from, or None.

    The Trainer prepares its data loader with accelerate: a ``DataLoaderShard`` whose batch sampler
    (a ``BatchSampler``) reads ``.sampler`` at the start of every epoch.
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if batch_sampler is not None and hasattr(batch_sampler, "sampler"):
        return batch_sampler
    return None


def install(dataloader, n_rows: int, seed: int) -> ReweightedSampler | str:
    """Replace the training sampler with a :class:`ReweightedSampler` of all-ones weights; the sampler,
    or one line saying why not."""
    holder = training_sampler_holder(dataloader)
    if holder is None:
        return "the Trainer's training data loader has no sampler to replace"
    size = len(dataloader.dataset) if hasattr(dataloader, "dataset") else None
    if size != n_rows:
        return (f"the Trainer's dataset has {size} rows and the training file {n_rows}: the rows cannot be matched "
                "(packed or filtered data?)")
    if isinstance(holder.sampler, ReweightedSampler):
        return holder.sampler
    sampler = ReweightedSampler(np.ones(n_rows), seed)
    sampler.set_epoch(getattr(holder.sampler, "epoch", 0))
    holder.sampler = sampler
    return sampler
