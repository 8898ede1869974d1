"""Hooks into other libraries' training loops (each imports its library only when used).

* :mod:`datatrace.integrations.transformers`: a Hugging Face ``TrainerCallback`` that saves
  the checkpoints TracIn needs, with their learning rates, and can feed the Distilled
  Datamodel's recorder.
"""
