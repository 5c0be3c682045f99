"""ckptsel inside other tools' loops: :mod:`ckptsel.integrations.transformers` measures each
checkpoint as a transformers ``Trainer`` (or TRL ``SFTTrainer``) saves it."""
