"""Device, dtype and thread settings shared by every model stage (torch imported lazily)."""

from __future__ import annotations

from typing import Any


def resolve_device(spec: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; anything else is returned as given."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: str, device: str) -> Any:
    """'auto' → bfloat16 on CUDA, float32 on CPU; otherwise the named torch dtype."""
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def set_threads(n: int) -> None:
    """Cap torch's intra-op threads so co-located actors do not oversubscribe the CPUs."""
    import torch

    torch.set_num_threads(n)
