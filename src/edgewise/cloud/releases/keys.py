"""The key ceremony's steps against a control plane's data directory and store
(``edgewise cloud keys init|rotate``; docs/updates.md, "Key ceremony").

* `init_keys`: root key(s) into the offline folder, online keys (targets, snapshot, timestamp)
  into ``<data>/tuf/keys``, root version 1 and the first (empty) targets, snapshot and timestamp
  into the store. Refused when the store has a root already.
* `rotate_keys`: the next root version, signed by the current root keys and any new ones;
  ``online=True`` replaces the three online keys (a compromised or lost one), ``new_root=True``
  replaces the root key(s). Targets, snapshot and timestamp are signed again with the keys the
  new root names, in the same transaction as the root. New online keys are written beside the
  old ones first (``*.key.new``) and moved over them once the store has the new root, so a
  failed transaction leaves the old keys in use. New root keys are saved the same way before the
  transaction; the old ones are renamed ``retired-root-*.key`` after it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from edgewise.cloud.releases.service import online_keys
from edgewise.cloud.store import Store
from edgewise.errors import ConfigError
from edgewise.security.tuf import keys as tk
from edgewise.security.tuf import repository
from edgewise.security.tuf.repository import Expiry, TopMetadata


@dataclass(frozen=True)
class KeysResult:
    root_version: int
    root_keys: tuple[str, ...]  # files written or used in the offline folder
    online_dir: Path
    root_file: Path  # copy of the new root in the offline folder


async def init_keys(root_dir: Path, data_dir: Path, store: Store, *, root_keys: int = 1,
                    threshold: int | None = None, now: datetime | None = None,
                    expiry: Expiry | None = None) -> KeysResult:
    now = now or datetime.now(UTC)
    if not 1 <= root_keys <= 16:
        raise ConfigError("--root-keys: use 1 to 16")
    if await store.tuf_top() is not None:
        raise ConfigError("this control plane has TUF keys already; `edgewise cloud keys "
                          "rotate` replaces them")
    root_folder = tk.RootKeys(Path(root_dir))
    if root_folder.key_files():
        raise ConfigError(f"{root_dir} holds root keys already: give an empty folder")
    online = online_keys(data_dir)
    if any(online.path(r).exists() for r in tk.ONLINE_ROLES):
        raise ConfigError(f"{online.folder} holds online keys already, but the store has no "
                          "TUF root: move them away and run `keys init` again")
    Path(root_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    roots = [tk.generate() for _ in range(root_keys)]
    signers = {role: tk.generate() for role in tk.ONLINE_ROLES}
    root = repository.new_root(roots, {r: s.public_key for r, s in signers.items()}, now=now,
                               expiry=expiry, threshold=threshold)
    top = repository.publish(TopMetadata(root), {}, signers, now=now, expiry=expiry)
    files = tuple(str(root_folder.add(s)) for s in roots)
    for role, signer in signers.items():
        tk.save_signer(online.path(role), signer)

    def change(old: TopMetadata | None) -> TopMetadata:
        if old is not None:
            raise ConfigError("another `keys init` made a TUF root meanwhile")
        return top

    await store.update_tuf(change, actor="cli:keys-init", action="tuf.keys.init", now=now)
    root_file = root_folder.save_root(1, root)
    return KeysResult(1, files, online.folder, root_file)


async def rotate_keys(root_dir: Path, data_dir: Path, store: Store, *, online: bool = True,
                      new_root: bool = False, now: datetime | None = None,
                      expiry: Expiry | None = None) -> KeysResult:
    now = now or datetime.now(UTC)
    root_folder = tk.RootKeys(Path(root_dir))
    old_roots = root_folder.load_all()
    keys = online_keys(data_dir)
    new_online = {role: tk.generate() for role in tk.ONLINE_ROLES} if online else None
    new_roots = [tk.generate() for _ in old_roots] if new_root else None
    staged: list[Path] = []
    try:
        for signer in new_roots or ():  # saved before the store names them: never lost
            path = root_folder.folder / f"root-{signer.public_key.keyid[:12]}.key.new"
            tk.save_signer(path, signer, overwrite=True)
            staged.append(path)
        if new_online is not None:
            for role, signer in new_online.items():
                path = keys.path(role).with_name(keys.path(role).name + ".new")
                tk.save_signer(path, signer, overwrite=True)
                staged.append(path)
            signers = new_online
        else:
            signers = {role: keys.load(role) for role in tk.ONLINE_ROLES}

        def change(old: TopMetadata | None) -> TopMetadata:
            if old is None:
                raise ConfigError("this control plane has no TUF root yet: run `edgewise cloud "
                                  "keys init` first")
            root = repository.rotate_root(
                old.root, old_roots, now=now, new_root_signers=new_roots,
                online=None if new_online is None
                else {r: s.public_key for r, s in new_online.items()}, expiry=expiry)
            top = repository.refresh(replace(old, root=root), signers,  # type: ignore[arg-type]
                                     now=now, expiry=expiry, force=True)
            assert top is not None  # type narrowing: force signs
            return top

        top = await store.update_tuf(change, actor="cli:keys-rotate", action="tuf.keys.rotate",
                                     now=now)
        assert top is not None  # type narrowing: change never returns None
        if new_roots is not None:
            for old_root in old_roots:
                root_folder.retire(old_root.public_key.keyid)
        for path in staged:
            os.replace(path, path.with_name(path.name.removesuffix(".new")))
        staged = []
    finally:
        for path in staged:
            with contextlib.suppress(OSError):
                path.unlink()
    files = [str(p) for p in root_folder.key_files()]
    version = repository.root_version(top.root)
    root_file = root_folder.save_root(version, top.root)
    return KeysResult(version, tuple(files), keys.folder, root_file)
