"""The local cache of remote tar shards: each URL is downloaded once, atomically, and read from disk after."""

import hashlib
import os
import shutil

from .errors import DataError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")


SHARD_CACHE = os.environ.get(
    "IDDPM_DS_SHARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iddpm_ds", "shards")
)


def local_shard(url: str) -> str:
    """A local path for a shard; remote URLs are downloaded once into SHARD_CACHE (atomically)."""
    if not url.startswith(REMOTE_PREFIXES):
        if not os.path.isfile(url):
            raise DataError(f"shard not found: {url}")
        return url
    import webdataset

    os.makedirs(SHARD_CACHE, exist_ok=True)
    path = os.path.join(SHARD_CACHE, hashlib.sha1(url.encode()).hexdigest()[:16] + ".tar")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with webdataset.gopen(url, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as e:
            raise DataError(f"cannot fetch shard {url}: {e}") from None
        os.replace(tmp, path)
    return path
