"""Training steps per editor family: :mod:`u2s.finetune.models.ip2p` (InstructPix2Pix, SafeAttention)."""
