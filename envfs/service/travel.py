"""Environments that travel: a snapshot exported as a bundle (`envfs.store.bundle`) and
imported into another store with no network, and the template it was built from."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import IO

from envfs.build import spec
from envfs.build.tree import tree_digest
from envfs.core.errors import BadInput, NotFound
from envfs.core.names import parse_pinned
from envfs.service.base import ServiceBase
from envfs.service.reports import EnvInfo, ImportReport
from envfs.store import bundle, verify
from envfs.store.files import META, fixed_tarinfo, remove_tree
from envfs.store.formats import (
    BundleInfo,
    InterpreterInfo,
    Manifest,
    Revision,
    SpecInfo,
)

#: The files of ``specs/<id>/`` a rebuild needs (a project's wheel comes with them).
SPEC_FILES = ("spec.json", "pyproject.toml", "uv.lock")


class Travel(ServiceBase):
    """Export and import (a part of `envfs.service.envs.Service`)."""

    def show(self, workflow: str, node: str, revision: int | None = None) -> EnvInfo:
        raise NotImplementedError

    def bind(self, workflow: str, node: str, snapshot_id: str, reason: str = "") -> Revision:
        raise NotImplementedError

    def _exported(self, target: str) -> tuple[str, SpecInfo, str]:
        """The built snapshot ``WF/NODE[@REV]`` names, its spec, and the name it goes by."""
        wf, node, revision = parse_pinned(target)
        name = f"{wf}/{node}"
        info = self.show(wf, node, revision)
        if not self.store.snapshot_ready(info.snapshot_id):
            raise NotFound(f"{name} is not built yet: build it first (`envfs build {name}`)")
        return info.snapshot_id, self.store.read_spec(info.snapshot_id), f"{name}@{info.revision}"

    def export_bundle(self, target: str, out: IO[bytes]) -> BundleInfo:
        """Write the bundle of ``WF/NODE[@REV]`` to ``out``: the same bytes every time."""
        sid, info, name = self._exported(target)
        digest = info.interpreter.digest
        parts = [("snapshot", self.store.snapshot_dir(sid)), ("spec", self.store.spec_dir(sid))]
        if digest is not None:
            parts.append(("interpreter", self.store.interpreter_dir(digest)))
        head = BundleInfo(snapshot_id=sid, interpreter=digest, exported_from=name)

        def progress(done: int, total: int) -> None:
            self._say(f"bundled {done} of {total} entries")

        sbom = self.sbom(target).encode()
        bundle.write_bundle(out, head, parts, progress, {"sbom.cdx.json": sbom})
        return head

    def export_oci(self, target: str, dest: Path, base: str | None = None) -> str:
        """Write an OCI image layout of ``WF/NODE[@REV]`` at ``dest`` (`envfs.store.oci`),
        over the image ``base`` (``oci:DIR[:TAG]``) instead of the C runtime layer if
        given; its manifest digest, the same every time for one snapshot."""
        import tempfile
        from datetime import UTC, datetime

        from envfs.store import oci

        sid, info, name = self._exported(target)
        digest = info.interpreter.digest
        if digest is None:
            raise BadInput(
                f"{name} runs on its node's own Python (built before self-contained envs): "
                "rebuild it (`envfs build --rebuild`) to make an image"
            )
        interp = self.store.read_interpreter(digest)
        manifest = self.store.read_manifest(sid)
        wf, node = name.split("@", 1)[0].split("/", 1)
        env_at, interp_at = f"envs/{wf}/{node}", f"envs/.interpreters/{digest}"
        mine = {e.path: e.sha256 for e in manifest.files if e.type == "file"}
        links = {
            e.path: f"/{interp_at}/{e.path}"
            for e in interp.files
            if e.type == "file" and e.path != interp.executable and mine.get(e.path) == e.sha256
        }
        self._say("writing the runtime, interpreter and env layers")
        sbom_at = f"envs/.sbom/{wf}/{node}.cdx.json"
        with tempfile.TemporaryDirectory(prefix="envfs-oci-") as tmp:
            sbom = Path(tmp) / "sbom.cdx.json"
            sbom.write_text(self.sbom(target))
            env_layer = oci.tree_entries(self.store.snapshot_dir(sid), env_at, links)
            env_layer.append(oci.Entry(sbom_at, "file", 0o444, sbom))
            under = oci.read_base(base) if base is not None else None
            layers = [
                *([] if under is not None else [oci.layer_tar(oci.runtime_entries())]),
                oci.layer_tar(oci.tree_entries(self.store.interpreter_dir(digest), interp_at)),
                oci.layer_tar(env_layer),
            ]
        created = datetime.fromtimestamp(int(manifest.built_at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        labels = {
            "org.opencontainers.image.title": f"{wf}/{node}",
            "dev.envfs.snapshot-id": sid,
            "dev.envfs.binding": name,
            "dev.envfs.sbom": f"/{sbom_at}",  # CycloneDX 1.6, in the env's layer
        }
        return oci.write_layout(
            dest,
            layers,
            entrypoint=[f"/{env_at}/bin/python"],
            env=[f"PATH=/{env_at}/bin:/usr/bin:/bin"],
            labels=labels,
            created=created,
            base=under,
        )

    def export_oci_archive(self, target: str, out: IO[bytes], base: str | None = None) -> str:
        """The image of `export_oci` as one tar on ``out``; its manifest digest."""
        import tempfile

        from envfs.store import oci

        with tempfile.TemporaryDirectory(prefix="envfs-oci-") as tmp:
            digest = self.export_oci(target, Path(tmp) / "image", base)
            oci.write_archive(Path(tmp) / "image", out)
        return digest

    def template_tar(self, target: str, out: IO[bytes]) -> None:
        """The files of `export_template` as one tar on ``out``."""
        import tarfile
        import tempfile

        with tempfile.TemporaryDirectory(prefix="envfs-template-") as tmp:
            names = self.export_template(target, Path(tmp))
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                for name in names:
                    path = Path(tmp) / name
                    with open(path, "rb") as f:
                        ti = fixed_tarinfo(name, tarfile.REGTYPE, 0o644, path.stat().st_size)
                        tar.addfile(ti, f)

    def sbom(self, target: str) -> str:
        """The CycloneDX 1.6 JSON of ``WF/NODE[@REV]`` (`envfs.build.sbom`): the same bytes
        every time."""
        from envfs.build import sbom

        sid, info, name = self._exported(target)
        _pyproject, lock = self.store.spec_files(sid)
        manifest = self.store.read_manifest(sid)
        return sbom.render(self.store.snapshot_dir(sid), info, manifest, lock, name)

    def export_template(self, target: str, dest: Path) -> list[str]:
        """Write the ``pyproject.toml``, ``uv.lock`` and ``.python-version`` ``WF/NODE[@REV]``
        was built from into ``dest`` (never over a file there); the names written."""
        sid, info, _name = self._exported(target)
        pyproject, lock = self.store.spec_files(sid)
        files = {
            "pyproject.toml": pyproject,
            "uv.lock": lock,
            ".python-version": info.interpreter.version + "\n",
        }
        taken = [n for n in files if (dest / n).exists()]
        if taken:
            raise BadInput(f"{dest} has {', '.join(taken)} already: give an empty directory")
        dest.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (dest / name).write_text(text)
        return sorted(files)

    def import_bundle(
        self, source: IO[bytes], bind_as: tuple[str, str] | None = None, label: str = ""
    ) -> ImportReport:
        """Check a bundle whole (every file against its manifest, the snapshot id against
        its spec, the interpreter against its digest), then publish what the store lacks
        (content it has already is linked, not stored again) and bind it if asked. A
        bundle that fails a check leaves nothing in the store."""
        self.store.ensure()
        work = self.store.staging / f"import.{uuid.uuid4().hex[:12]}"
        work.mkdir()
        try:
            self._say("reading the bundle")
            head = bundle.read_bundle(source, work)
            self._say("checking every file against its manifest")
            info, manifest, interp = _checked(work, head)
            with self.store.gc_fence():
                added = self._publish_import(work, info, manifest, interp)
                revision = None
                if bind_as is not None:
                    revision = self.bind(*bind_as, head.snapshot_id, f"imported {label}".strip())
        finally:
            remove_tree(work)
        return ImportReport(
            snapshot_id=head.snapshot_id,
            added=added,
            binding=None if revision is None else f"{revision.workflow}/{revision.node}",
            revision=None if revision is None else revision.revision,
        )

    def _publish_import(
        self,
        work: Path,
        info: SpecInfo,
        manifest: Manifest,
        interp: InterpreterInfo | None,
    ) -> list[str]:
        sid = info.snapshot_id
        added = []
        if interp is not None and not self.store.interpreter_ready(interp.digest):
            staged = self.store.new_interpreter_staging(self.host)
            try:
                self.store.receive_tree(work / "interpreter", staged, interp.files)
                _copy_meta(work / "interpreter", staged)
                if self.store.publish_interpreter(staged, interp.digest):
                    added.append("interpreter")
            except BaseException:
                remove_tree(staged)
                raise
        extra = [p for p in (work / "spec").iterdir() if p.name not in SPEC_FILES]
        pyproject = (work / "spec/pyproject.toml").read_text()
        lock = (work / "spec/uv.lock").read_text()
        if self.store.write_spec(info, pyproject, lock, extra[0] if extra else None):
            self.store.audit("spec_written", self.host, sid, spec=info.model_dump(mode="json"))
            added.append("spec")
        self.index.remember_spec(info)
        if not self.store.snapshot_ready(sid):
            staged = self.store.new_staging(sid, self.host)
            try:
                self.store.receive_tree(work / "snapshot", staged, manifest.files)
                _copy_meta(work / "snapshot", staged)
                if self.store.publish(staged, sid):
                    added.append("snapshot")
                    self.store.audit(
                        "built", self.host, sid, imported=True, files=manifest.file_count
                    )
            except BaseException:
                remove_tree(staged)
                raise
        self.index.mark_ready(sid)
        return added


def _copy_meta(src: Path, dest: Path) -> None:
    (dest / META).mkdir(exist_ok=True)
    for item in sorted((src / META).iterdir()):
        if item.name == "packs.json":  # its packs do not travel (bundles leave them out)
            continue
        if item.is_file() and not item.is_symlink():
            shutil.copyfile(item, dest / META / item.name)


def _checked(work: Path, head: BundleInfo) -> tuple[SpecInfo, Manifest, InterpreterInfo | None]:
    """The bundle's spec, manifest and interpreter, once every check holds; else one
    `BadBundle` line naming the first that does not."""
    bad = bundle.BadBundle
    try:
        info = SpecInfo.model_validate_json((work / "spec/spec.json").read_bytes())
        pyproject = (work / "spec/pyproject.toml").read_text()
        lock = (work / "spec/uv.lock").read_text()
        manifest = Manifest.model_validate_json(
            (work / "snapshot" / META / "manifest.json").read_bytes()
        )
    except (OSError, ValueError) as exc:
        raise bad(f"the bundle lacks a readable spec or manifest ({type(exc).__name__})") from None
    sid = head.snapshot_id
    if info.snapshot_id != sid or manifest.snapshot_id != sid:
        raise bad("the bundle's spec, manifest and head name different snapshots")
    files = spec.ProjectFiles(pyproject, lock)
    if spec.snapshot_id(files, info.interpreter, info.selection) != sid:
        raise bad(f"the bundle's spec does not give snapshot {sid[:12]} (tampered?)")
    if tree_digest(manifest.files) != manifest.tree_digest:
        raise bad("the bundle's manifest does not match its own digest (tampered?)")
    problems = verify.tree_problems(work / "snapshot", manifest.files)
    if problems:
        raise bad(f"the bundle's snapshot does not match its manifest: {problems[0]}")
    interp = None
    digest = info.interpreter.digest
    if digest is not None:
        try:
            interp = InterpreterInfo.model_validate_json(
                (work / "interpreter" / META / "interpreter.json").read_bytes()
            )
        except (OSError, ValueError):
            raise bad(f"the bundle lacks its interpreter {digest[:12]}") from None
        sources = [e for e in interp.files if "__pycache__" not in e.path.split("/")]
        if interp.digest != digest or tree_digest(sources) != digest:
            raise bad(f"the bundle's interpreter does not match its digest {digest[:12]}")
        problems = verify.tree_problems(work / "interpreter", interp.files)
        if problems:
            raise bad(f"the bundle's interpreter does not match its files: {problems[0]}")
    return info, manifest, interp
