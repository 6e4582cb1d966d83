"""Reading a state dict from a file or URL, without running code from it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

__all__ = ["read_state_dict"]


def read_state_dict(path_or_url: str) -> dict[str, Tensor]:
    """Reads a state dict with `weights_only=True`; unwraps a checkpoint {"model": ...}.

    A URL (http, https, file) goes through torch.hub's cache, so it is downloaded once.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the URL could not be downloaded (e.g. the machine is offline).
        ValueError: the file holds no state dict of tensors.
    """
    if urlparse(path_or_url).scheme in ("http", "https", "file"):
        try:
            data = torch.hub.load_state_dict_from_url(
                path_or_url, map_location="cpu", weights_only=True
            )
        except OSError as e:  # URLError and HTTPError are OSErrors
            raise RuntimeError(
                f"could not download {path_or_url!r} ({e}); without network access, download "
                "the file elsewhere and give its local path"
            ) from e
    else:
        path = Path(path_or_url).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path_or_url!r} does not hold a state dict of tensors")
    return dict(data)
