"""The hashrec training job: ``python -m train`` / ``torchrun -m train``."""
