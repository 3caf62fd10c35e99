"""Where a checkpoint or tokenizer comes from: a local directory, or a Hub repository at a pinned revision
(downloaded into the HF cache, resumably; offline nodes read the cache). Hub errors become UserErrors
that name the repository and revision."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mamba_align.utils import UserError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_call(src: Source, fn, *args, **kwargs):
    """Run a huggingface_hub call; turn its errors into UserErrors that name the repo and revision."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what, repo_id, revision = src.what, src.name, src.revision
    try:
        return fn(*args, **kwargs)
    except GatedRepoError as e:
        raise UserError(f"{what} {repo_id!r} is gated: accept its terms on the Hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"{what} {repo_id!r}: repository not found on the Hugging Face Hub "
                        f"(RepositoryNotFoundError; a private repo needs HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise UserError(f"{what} {repo_id!r}: revision {revision!r} not found (RevisionNotFoundError)") from e
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{what} {repo_id}@{revision}: Hub request failed: {type(e).__name__}: {e}") from e


class Source:
    """A checkpoint or tokenizer (`what`) by local path or Hub id; `files` lists it without downloading,
    `fetch(patterns)` returns a local dir holding those files, and `commit` is then the resolved sha."""

    def __init__(self, what: str, name: str, revision: str | None):
        self.what, self.name, self.revision = what, name, revision
        self.local = Path(name).is_dir()
        self.commit: str | None = None
        if self.local:
            self.dir = Path(name)
            self.files = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
            if revision:
                log.info("%s %s is a local directory; ignoring revision %r", what, name, revision)
            return
        if not HUB_ID.match(name):
            raise UserError(f"{what} {name!r}: no such local directory, and not a Hub id of the form owner/name")
        if not revision:
            raise UserError(f"{what} {name!r}: no such local directory; as a Hub id it needs a pinned revision "
                            "(a commit sha or tag)")
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:  # offline nodes: the revision must be in the HF cache already
            snapshot = self.fetch(None)
            self.files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
        else:
            self.files = _hub_call(self, HfApi().list_repo_files, name, revision=revision,
                                  token=os.environ.get("HF_TOKEN") or None)

    def fetch(self, patterns: list[str] | None) -> Path:
        if self.local:
            return self.dir
        from huggingface_hub import snapshot_download

        # snapshot_download resumes interrupted downloads from the HF cache (HF_HOME).
        path = Path(_hub_call(self, snapshot_download, self.name,
                             revision=self.revision, allow_patterns=patterns,
                             token=os.environ.get("HF_TOKEN") or None))
        self.commit = path.name  # the cache names snapshot folders by commit sha
        return path
