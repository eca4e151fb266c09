"""Host-to-device copies that never stall the host.

A copy from pageable host memory is staged by the driver, and once it outgrows the staging buffer
(prefill's 16k-token inputs do) the call waits until the device has drained the work queued before
it: the host stops preparing the next step. Staged through PyTorch's pinned-memory cache instead,
the copy is queued and the call returns at once (the cache keeps the pinned block until the copy
is done)."""
import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on device (a tensor already on a GPU is copied there directly, or returned as it is)."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pinned(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A host array in pinned memory, for FlashInfer's plan(), which copies its inputs to the device
    (a tensor already on the device is returned as it is)."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.pin_memory() if not t.is_cuda and torch.cuda.is_available() else t
