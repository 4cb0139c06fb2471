"""The cluster token from a file (`cluster_token_file`), so it is never in argv or a unit.

systemd's `LoadCredential=cluster_token:/etc/rolemesh/cluster_token` puts it at
`$CREDENTIALS_DIRECTORY/cluster_token`; Kubernetes mounts a Secret as a file. A file that
others can read is refused: the token lets a host join the cluster.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class TokenFileError(ValueError):
    pass


def read_token_file(value: str | Path) -> str:
    path = Path(os.path.expandvars(str(value))).expanduser()
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise TokenFileError(f"cluster_token_file: cannot read {path}: {exc.strerror}") from exc
    # Group access is allowed: a Kubernetes Secret mounted with defaultMode 0400 and an
    # fsGroup reads 0440 (the pod's own group); anyone else may not read it.
    if info.st_mode & stat.S_IRWXO:
        raise TokenFileError(f"cluster_token_file: {path} is readable by others "
                             f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    token = text.strip()
    if not token:
        raise TokenFileError(f"cluster_token_file: {path} is empty")
    return token
