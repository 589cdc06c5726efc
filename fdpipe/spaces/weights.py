"""Weight files of pretrained spaces: local files with checksums, or a cache/hub download.

Every pretrained family resolves its weights here so that the errors read the
same: a missing file or an unreachable hub names the file to fetch and the
config key to set (``spaces.<name>.weights``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fdpipe.store import file_sha256

log = logging.getLogger(__name__)

# Either variable set to a true value forbids every download attempt.
OFFLINE_VARIABLES = ("FDPIPE_OFFLINE", "HF_HUB_OFFLINE")


def is_offline() -> bool:
    """True when FDPIPE_OFFLINE or HF_HUB_OFFLINE is set to 1/true/yes/on."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in OFFLINE_VARIABLES)


def check_weights_file(space: str, path: str | Path, sha256: str | None = None) -> Path:
    """Return ``path`` after checking that it exists and, when given, its SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"space '{space}': weights file {path} not found; download it and set "
            f"spaces.{space}.weights to its path"
        )
    if sha256:
        actual = file_sha256(path)
        expected = sha256.strip().lower()
        # A prefix is accepted so that configs can quote the short form (>= 8 hex digits).
        if len(expected) < 8 or not actual.startswith(expected):
            raise ValueError(
                f"space '{space}': weights file {path} has SHA-256 {actual}, but "
                f"spaces.{space}.weights_sha256 is {sha256!r}; fetch the file again or "
                f"correct the checksum"
            )
        log.info("space %s: weights file %s matches SHA-256 %s", space, path, expected)
    return path


def hub_weights(space: str, repo_id: str, filename: str) -> Path:
    """Return the Hugging Face hub file, from the local cache or downloaded."""
    from huggingface_hub import hf_hub_download

    fetch = f"{filename} from the Hugging Face repository {repo_id}"
    try:
        if is_offline():
            path = hf_hub_download(repo_id, filename, local_files_only=True)
        else:
            path = hf_hub_download(repo_id, filename)
    except Exception as err:  # the hub client raises many types for "not cached / no network"
        raise FileNotFoundError(
            f"space '{space}': could not load {fetch} ({type(err).__name__}: {err}); on a "
            f"machine without network access download that file elsewhere and set "
            f"spaces.{space}.weights to its local path"
        ) from err
    log.info("space %s: using %s", space, path)
    return Path(path)


def url_weights(space: str, url: str) -> Path:
    """Return a file from the torch hub cache, downloading it there when online."""
    import torch.hub

    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        log.info("space %s: using cached weights %s", space, target)
        return target
    advice = (f"download {url} and set spaces.{space}.weights to its local path (or place it "
              f"at {target})")
    if is_offline():
        raise FileNotFoundError(f"space '{space}': weights not cached and downloads are "
                                f"disabled (offline); {advice}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as err:  # URLError, HTTPError, OSError, timeouts
        raise FileNotFoundError(
            f"space '{space}': download failed ({type(err).__name__}: {err}); {advice}"
        ) from err
    return target
