"""The coordinator's state folder, in one place:

STATE/
  lock                       flock held by the one process using the folder
  state.sqlite               rounds, accepted updates, releases, device statuses (coordinator.store)
  spool/round-{r}.log        accepted update payloads of open rounds, fsynced before the ack
  releases/v{N}/             kept release bundles (the newest `keep_releases`)
  opt/v{N}.{opt}.safetensors server-optimizer state after release N, per optimizer
  dp.secret                  256-bit seed of the DP noise (0600), made on first use
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

from edgelearn.atomic import replace_dir, write_bytes
from edgelearn.bundle import Manifest, verify_bundle


class StateLockedError(RuntimeError):
    """Another process holds the state folder."""


class StateLayout:
    """Paths of a coordinator state folder, and the few operations that are about the folder itself."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sqlite = root / "state.sqlite"
        self.spool = root / "spool"
        self.releases = root / "releases"
        self.opt = root / "opt"
        self.secret = root / "dp.secret"

    def release(self, version: int) -> Path:
        return self.releases / f"v{version}"

    def opt_state(self, version: int, optimizer: str) -> Path:
        """Server-optimizer state after release `version`, per optimizer: a restart with another
        `--server-opt` starts that optimizer's state afresh instead of reading the other's."""
        return self.opt / f"v{version}.{optimizer}.safetensors"

    def drop_opt_state(self, version: int) -> None:
        """Delete the server-optimizer state saved after release `version` (whichever optimizer wrote it)."""
        for p in self.opt.glob(f"v{version}.*safetensors"):
            p.unlink(missing_ok=True)

    def lock(self, what: str) -> IO[str]:
        """An exclusive flock on `lock`, held for the life of the returned file object."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / "lock", "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StateLockedError(f"{self.root} is in use by another process; stop it before {what}") from None
        return f

    def dp_secret(self) -> int:
        """The 256-bit secret behind every round's DP noise (mode 0600, made on first use). Anyone who learns
        it can subtract the noise from the releases: it never leaves the state folder."""
        if not self.secret.exists():
            write_bytes(self.secret, os.urandom(32).hex().encode())  # mkstemp: 0600 from creation on
        return int(self.secret.read_text().strip(), 16)

    def import_bundle(self, bundle_dir: Path) -> Manifest:
        """Copy the operator's starting bundle into `releases/v{version}` (atomically) and return its manifest."""
        manifest = verify_bundle(bundle_dir)
        dest = self.release(manifest.version)
        if not dest.exists():
            self.releases.mkdir(parents=True, exist_ok=True)
            tmp = self.releases / f".v{manifest.version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle_dir, tmp)
            replace_dir(tmp, dest)  # fsynced: a power cut cannot leave a torn v1 that fails every start
        return manifest
