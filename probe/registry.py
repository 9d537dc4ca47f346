"""The model registry: named, numbered, immutable model versions, a ``champion`` alias, lineage. No torch import.

Layout of a registry folder (default ``models/``; env ``PROBE_REGISTRY``; ``--registry DIR``)::

    <root>/registry.sqlite           metadata (SQLite in WAL mode; every change is one BEGIN IMMEDIATE transaction)
    <root>/objects/<sha256>.probe    model files, stored once under their content hash, never modified

A version is written in two steps: the model file is copied into ``objects/`` atomically, then one transaction
inserts the version row and (when promoted) moves the champion. A crash between the two leaves an unreferenced
object and the registry as it was; a crash inside the transaction is rolled back by SQLite.

The champion of a name is the top of its champion stack: ``promote`` pushes, ``rollback`` pops back to the
previous champion (skipping versions retired since). Retired versions cannot be promoted nor loaded for serving.

Model references: ``NAME`` (= the champion), ``NAME@champion``, ``NAME@3``; :func:`load_model` takes a reference
or a ``.probe`` path.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ProbeError
from .files import atomic_path
from .sources import sha256_file

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "models"
ENV_REGISTRY = "PROBE_REGISTRY"
DB_FILE = "registry.sqlite"
OBJECTS = "objects"
SCHEMA_VERSION = 1
#: A test hook: when set to a file path, register() creates that file after storing the model object and then
#: sleeps before its transaction, so a test can SIGKILL a refit between training and promotion.
PAUSE_ENV = "PROBE_PAUSE_BEFORE_COMMIT"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?:@(?P<ref>champion|[0-9]+))?$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

# Version statuses: "active" (registered; servable), "rejected" (a challenger the gate turned down; servable on
# request, promotable by hand), "retired" (never promoted or served again).
ACTIVE, REJECTED, RETIRED = "active", "rejected", "retired"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    parent INTEGER,
    created TEXT NOT NULL,
    user TEXT,
    host TEXT,
    space_digest TEXT,
    keys_digest TEXT,
    n_train INTEGER,
    head TEXT,
    metrics TEXT,
    sources TEXT,
    gate TEXT,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS champions (
    name TEXT NOT NULL,
    pos INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, pos)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL,
    version INTEGER,
    detail TEXT,
    user TEXT,
    host TEXT
);
"""


class RegistryError(ProbeError):
    """A registry operation that cannot be done (unknown name or version, retired version, bad reference)."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version (a row of the registry, plus the path of its immutable model file)."""

    name: str
    version: int
    path: Path
    sha256: str
    status: str
    is_champion: bool
    created: str
    parent: int | None = None
    user: str | None = None
    host: str | None = None
    space_digest: str | None = None
    keys_digest: str | None = None
    n_train: int | None = None
    head: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    gate: dict | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["ref"] = self.ref
        return d


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
                            "(starting with a letter or digit)")
    return name


def is_model_ref(s) -> bool:
    """True for a registry reference (``NAME``, ``NAME@champion``, ``NAME@3``), False for a model file path.

    An existing file, or anything ending in ``.probe`` or containing a path separator, is a path.
    """
    if not isinstance(s, str):
        return False
    if s.endswith(".probe") or "/" in s or os.sep in s or os.path.isfile(s):
        return False
    return REF_RE.match(s) is not None


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME`` / ``NAME@champion`` / ``NAME@3`` -> (name, "champion" or the version digits)."""
    m = REF_RE.match(ref or "")
    if not m:
        raise RegistryError(f"invalid model reference {ref!r}: use NAME, NAME@champion or NAME@VERSION")
    return m["name"], m["ref"] or "champion"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who() -> tuple[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # no login name (containers): not worth failing a registration for
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return user, socket.gethostname()


class Registry:
    """A model registry folder. Cheap to construct; connections are opened per operation (thread- and
    process-safe: SQLite WAL lets readers run while one writer commits)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root if root is not None else os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY)
        self.db_path = self.root / DB_FILE
        self.objects = self.root / OBJECTS

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- connections -------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.db_path.is_file()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection (never creates the registry); RegistryError when there is none."""
        if not self.exists():
            raise RegistryError(f"{self.root}: no model registry here (register a model with "
                                "`probe fit ... --register NAME`, or pass --registry DIR / set PROBE_REGISTRY)")
        try:
            con = sqlite3.connect(f"file:{self.db_path.resolve()}?mode=ro", uri=True, timeout=30,
                                  isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"{self.db_path}: cannot open the registry ({e})") from e
        try:
            con.row_factory = sqlite3.Row
            yield con
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.db_path}: registry database error ({e})") from e
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); the registry is created on first use."""
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.executescript(_SCHEMA)
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.db_path}: registry database error ({e})") from e
        finally:
            con.close()

    # -- reading -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.exists():
            return []
        with self._read() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``, or of every name), oldest first."""
        if not self.exists():
            if name is not None:
                raise RegistryError(f"{self.root}: no model registry here")
            return []
        with self._read() as con:
            if name is None:
                rows = con.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
            else:
                rows = con.execute("SELECT * FROM versions WHERE name = ? ORDER BY version",
                                   (validate_name(name),)).fetchall()
                if not rows:
                    raise RegistryError(f"{self.root}: no model named {name!r}{self._known_hint(con)}")
            champs = {n: v for n, v in self._champions(con)}
        return [self._version(r, champs.get(r["name"])) for r in rows]

    def resolve(self, ref: str) -> ModelVersion:
        """``NAME`` / ``NAME@champion`` / ``NAME@3`` -> the ModelVersion (one short read transaction)."""
        name, which = parse_ref(ref)
        with self._read() as con:
            con.execute("BEGIN")
            champion = self._champion(con, name)
            if which == "champion":
                if champion is None:
                    exists = con.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone()
                    con.execute("COMMIT")
                    if exists:
                        raise RegistryError(f"{name}: has no champion (every version was rolled back or retired)")
                    raise RegistryError(f"{self.root}: no model named {name!r}{self._known_hint(con)}")
                version = champion
            else:
                version = int(which)
            row = con.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
            con.execute("COMMIT")
            if row is None:
                raise RegistryError(f"{self.root}: {name} has no version {version}")
        return self._version(row, champion)

    def history(self, name: str | None = None) -> list[dict]:
        """The event log (register, promote, rollback, retire), oldest first."""
        if not self.exists():
            return []
        with self._read() as con:
            q = "SELECT * FROM events" + (" WHERE name = ?" if name else "") + " ORDER BY id"
            return [dict(r) for r in con.execute(q, (name,) if name else ())]

    # -- writing -----------------------------------------------------------------------------------------

    def register(self, model_file: str | os.PathLike, name: str, *, parent: int | None = None,
                 gate: dict | None = None, promote: bool | None = None) -> ModelVersion:
        """Store ``model_file`` and add it as the next version of ``name``.

        ``promote=None``: the first version of a name becomes champion, later ones do not; True/False force it.
        ``gate`` (the refit gate's decision record) is stored with the version; a version with
        ``gate["decision"] == "rejected"`` gets status "rejected".
        """
        from .model import read_manifest

        validate_name(name)
        manifest = read_manifest(model_file)  # refuses anything that is not a probe model file
        sha = self._store_object(model_file)
        pause = os.environ.get(PAUSE_ENV)
        if pause:
            Path(pause).write_text(f"{os.getpid()}\n")
            time.sleep(float(os.environ.get(PAUSE_ENV + "_SECONDS", "60")))
        training = manifest.get("training", {}) or {}
        head = manifest.get("head", {}) or {}
        status = REJECTED if gate and gate.get("decision") == "rejected" else ACTIVE
        user, host = _who()
        created = _now()
        with self._write() as con:
            if parent is not None and not con.execute(
                    "SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, parent)).fetchone():
                raise RegistryError(f"{name}: parent version {parent} does not exist")
            version = con.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name = ?",
                                  (name,)).fetchone()[0]
            first = version == 1
            con.execute(
                "INSERT INTO versions (name, version, sha256, status, parent, created, user, host, space_digest, "
                "keys_digest, n_train, head, metrics, sources, gate) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, version, sha, status, parent, created, user, host,
                 (manifest.get("backbone") or {}).get("space_digest"), training.get("keys_digest"),
                 training.get("n_inputs"), _dumps(head), _dumps(manifest.get("metrics", {})),
                 _dumps({k: training.get(k) for k in ("source", "val_source", "val_split", "seed", "policy",
                                                        "new_source", "n_cached", "n_extracted") if k in training}),
                 None if gate is None else _dumps(gate)),
            )
            self._event(con, name, "register", version, {"sha256": sha, "parent": parent, "status": status})
            if promote if promote is not None else (first and status != REJECTED):
                self._push_champion(con, name, version)
                self._event(con, name, "promote", version, {"by": "gate" if gate else "register"})
        log.info("registered %s@%d (%s)", name, version, sha[:12])
        return self.resolve(f"{name}@{version}")

    def promote(self, name: str, version: int) -> ModelVersion:
        """Make ``NAME@version`` the champion (a retired version is refused)."""
        validate_name(name)
        with self._write() as con:
            row = self._row(con, name, version)
            if row["status"] == RETIRED:
                raise RegistryError(f"{name}@{version} is retired and cannot be promoted")
            if self._champion(con, name) == int(version):
                raise RegistryError(f"{name}@{version} is already the champion")
            self._push_champion(con, name, int(version))
            self._event(con, name, "promote", int(version), {"by": "user"})
        return self.resolve(f"{name}@{version}")

    def rollback(self, name: str) -> ModelVersion:
        """Restore the previous champion (the one before the current, skipping retired versions)."""
        validate_name(name)
        with self._write() as con:
            stack = con.execute("SELECT pos, version FROM champions WHERE name = ? ORDER BY pos DESC",
                                (name,)).fetchall()
            if not stack:
                self._row(con, name, None)
                raise RegistryError(f"{name}: has no champion to roll back")
            current = stack[0]["version"]
            target = None
            for entry in stack[1:]:
                status = con.execute("SELECT status FROM versions WHERE name = ? AND version = ?",
                                     (name, entry["version"])).fetchone()[0]
                if status != RETIRED and entry["version"] != current:
                    target = entry
                    break
            if target is None:
                raise RegistryError(f"{name}: no previous champion to roll back to (current is {name}@{current})")
            con.execute("DELETE FROM champions WHERE name = ? AND pos > ?", (name, target["pos"]))
            self._event(con, name, "rollback", target["version"], {"from": current})
        return self.resolve(f"{name}@{target['version']}")

    def retire(self, name: str, version: int) -> ModelVersion:
        """Retire a version: it can no longer be promoted nor loaded for serving. The champion cannot be retired
        (promote another version or roll back first)."""
        validate_name(name)
        with self._write() as con:
            row = self._row(con, name, version)
            if self._champion(con, name) == int(version):
                raise RegistryError(f"{name}@{version} is the champion; promote another version or roll back "
                                    "before retiring it")
            if row["status"] == RETIRED:
                raise RegistryError(f"{name}@{version} is already retired")
            con.execute("UPDATE versions SET status = ? WHERE name = ? AND version = ?", (RETIRED, name, version))
            self._event(con, name, "retire", int(version), {"previous_status": row["status"]})
        return self.resolve(f"{name}@{version}")

    # -- model files -------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        """The stored file of ``sha256``, refusing anything that would lead outside the registry's objects/."""
        if not _SHA_RE.match(sha256 or ""):
            raise RegistryError(f"{self.root}: corrupt registry entry (sha256 {sha256!r})")
        path = self.objects / f"{sha256}.probe"
        base = self.objects.resolve()
        if path.is_symlink() or path.resolve().parent != base:
            raise RegistryError(f"{path}: model object is not a plain file inside {base}")
        return path

    def verified_path(self, mv: ModelVersion) -> Path:
        """The version's model file after checking its bytes still hash to the recorded sha256."""
        path = self.object_path(mv.sha256)
        if not path.is_file():
            raise RegistryError(f"{mv.ref}: model file {path} is missing from the registry")
        found = sha256_file(path)
        if found != mv.sha256:
            raise RegistryError(f"{mv.ref}: model file {path} is corrupt (sha256 {found[:16]}..., "
                                f"expected {mv.sha256[:16]}...)")
        return path

    def _store_object(self, model_file: str | os.PathLike) -> str:
        sha = sha256_file(model_file)
        dest = self.object_path(sha)
        if dest.is_file() and sha256_file(dest) == sha:
            return sha
        self.objects.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(model_file, tmp)
        if sha256_file(dest) != sha:
            raise RegistryError(f"{model_file}: changed while being copied into the registry")
        return sha

    # -- helpers -----------------------------------------------------------------------------------------

    @staticmethod
    def _champion(con, name: str) -> int | None:
        row = con.execute("SELECT version FROM champions WHERE name = ? ORDER BY pos DESC LIMIT 1",
                          (name,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _champions(con) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in con.execute(
            "SELECT c.name, c.version FROM champions c JOIN (SELECT name, MAX(pos) AS pos FROM champions "
            "GROUP BY name) top ON c.name = top.name AND c.pos = top.pos")]

    @staticmethod
    def _push_champion(con, name: str, version: int) -> None:
        pos = con.execute("SELECT COALESCE(MAX(pos), 0) + 1 FROM champions WHERE name = ?", (name,)).fetchone()[0]
        con.execute("INSERT INTO champions (name, pos, version) VALUES (?, ?, ?)", (name, pos, version))

    def _row(self, con, name: str, version: int | None):
        if version is None:
            row = con.execute("SELECT * FROM versions WHERE name = ? LIMIT 1", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"{self.root}: no model named {name!r}")
            return row
        row = con.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, int(version))).fetchone()
        if row is None:
            if not con.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"{self.root}: no model named {name!r}")
            raise RegistryError(f"{self.root}: {name} has no version {version}")
        return row

    @staticmethod
    def _known_hint(con) -> str:
        names = [r[0] for r in con.execute("SELECT DISTINCT name FROM versions ORDER BY name LIMIT 10")]
        return f" (registered: {', '.join(names)})" if names else " (the registry is empty)"

    @staticmethod
    def _event(con, name: str, action: str, version: int | None, detail: dict) -> None:
        user, host = _who()
        con.execute("INSERT INTO events (time, name, action, version, detail, user, host) VALUES (?,?,?,?,?,?,?)",
                    (_now(), name, action, version, _dumps(detail), user, host))

    def _version(self, row, champion: int | None) -> ModelVersion:
        return ModelVersion(
            name=row["name"], version=int(row["version"]), path=self.objects / f"{row['sha256']}.probe",
            sha256=row["sha256"], status=row["status"], is_champion=champion == row["version"],
            created=row["created"], parent=row["parent"], user=row["user"], host=row["host"],
            space_digest=row["space_digest"], keys_digest=row["keys_digest"], n_train=row["n_train"],
            head=_loads(row["head"]) or {}, metrics=_loads(row["metrics"]) or {},
            sources=_loads(row["sources"]) or {}, gate=_loads(row["gate"]),
        )


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _loads(text):
    return None if text is None else json.loads(text)


def load_model(ref_or_path, *, registry: str | os.PathLike | Registry | None = None, trust: bool = False,
               check_versions: bool = True):
    """A :class:`~probe.model.ProbeModel` from a ``.probe`` path or a registry reference (``NAME``,
    ``NAME@champion``, ``NAME@3``). A registry model is checked against its sha256 first; a retired version is
    refused. The loaded model's ``meta["registry"]`` records name, version, sha256 and registry root."""
    from .model import load

    if not is_model_ref(str(ref_or_path)) or isinstance(ref_or_path, Path):
        return load(Path(ref_or_path), trust=trust, check_versions=check_versions)
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    mv = reg.resolve(str(ref_or_path))
    if mv.status == RETIRED:
        raise RegistryError(f"{mv.ref} is retired and cannot be loaded for use")
    model = load(reg.verified_path(mv), trust=trust, check_versions=check_versions)
    model.meta_ = dict(model.meta_ or {})
    model.meta_["registry"] = {"name": mv.name, "version": mv.version, "ref": mv.ref, "sha256": mv.sha256,
                              "root": str(reg.root), "status": mv.status, "champion": mv.is_champion}
    return model
