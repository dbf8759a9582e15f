"""What the CLI, the API and the daemon do, in terms of the store, the builder and the
index: `Service` (over `Building` and `ServiceBase`) and the `Inputs` it resolves.
``StoreCatalog`` (``catalog``) is the daemon's view of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from envfs.build import capture, interpreters, raydriver, sources, spec, uv
from envfs.core.config import node_time
from envfs.core.errors import BadInput, NotFound
from envfs.core.names import parse_target
from envfs.core.views import BindingView
from envfs.service.access import Access
from envfs.service.binding import Binding
from envfs.service.reports import DiskUsage, EnvInfo, InterpreterUse, VerifyReport
from envfs.service.travel import Travel
from envfs.store.files import regular_files
from envfs.store.formats import (
    GcReport,
    Interpreter,
    InterpreterInfo,
    Revision,
    Selection,
    SpecInfo,
)

#: How source distributions are treated: ``sandboxed`` builds them into wheels as an
#: unprivileged user in a private mount namespace (`envfs.build.sandbox`), then installs
#: wheels only; ``wheels-only`` refuses a spec that needs one.
BUILD_POLICIES = ("sandboxed", "wheels-only")


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a user gave to build or bind: packages, a requirements file, or a uv project."""

    packages: tuple[str, ...] = ()
    requirements_file: Path | None = None
    project: Path | None = None
    python: str | None = None
    upgrade: bool = False
    allow_local: bool = False
    index_only: bool = False  # over the API: no path, git or URL source of any kind
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    no_dev: bool = False
    install_project: bool = False
    ray_driver: str | None = None
    build_policy: str | None = None  # None: the store's (envfs.toml); see BUILD_POLICIES


@dataclass(frozen=True, slots=True)
class Resolved:
    snapshot_id: str
    interpreter: Interpreter


class Service(Binding, Travel, Access):
    # -- specs ----------------------------------------------------------------------------

    def resolve(self, inputs: Inputs) -> Resolved:
        """Turn inputs into a stored spec and its snapshot id (locking if needed)."""
        if inputs.project is not None and (inputs.packages or inputs.requirements_file):
            raise BadInput("give either --project DIR or packages / -r FILE, not both")
        if inputs.project is not None and (inputs.index_url or inputs.extra_index_urls):
            raise BadInput(
                "--index-url/--extra-index-url are for requirement lists; a project names its "
                "indexes in its pyproject ([[tool.uv.index]]) and its uv.lock"
            )
        selection = Selection(
            extras=list(inputs.extras), groups=list(inputs.groups), no_dev=inputs.no_dev
        )
        if inputs.project is None and (selection != Selection() or inputs.install_project):
            raise BadInput("--extra, --group, --no-dev and --install-project need --project")
        # validate everything cheap before touching the store
        reqs: list[str] = []
        hashes: dict[str, frozenset[str]] = {}
        files: spec.ProjectFiles | None = None
        indexes = spec.make_indexes(inputs.index_url, inputs.extra_index_urls)
        if inputs.build_policy not in (None, *BUILD_POLICIES):
            raise BadInput(f"--build-policy is one of {', '.join(BUILD_POLICIES)}")
        if inputs.project is not None:
            files = spec.read_project(inputs.project)
            if inputs.index_only:
                sources.check_index_only(
                    files, "the project", sources.configured_registries(os.environ)
                )
            spec.check_project_indexes(files.pyproject, str(inputs.project))
            spec.check_selection(files.pyproject, selection, str(inputs.project))
        else:
            raw = list(inputs.packages)
            if inputs.requirements_file is not None:
                from_file = spec.read_requirements_file(inputs.requirements_file)
                raw += from_file.requirements
                hashes = from_file.hashes
            reqs = spec.normalize_requirements(
                raw, allow_local=inputs.allow_local, index_only=inputs.index_only
            )
        python, requires = inputs.python, None
        if inputs.project is not None:  # the project's .python-version and requires-python
            pinned, requires = spec.project_python(inputs.project)
            python = python or pinned
        driver = raydriver.probe(inputs.ray_driver) if inputs.ray_driver else None
        if driver is not None:
            if inputs.python and not driver.python_version.startswith(inputs.python):
                raise BadInput(
                    f"--python {inputs.python} differs from the Ray driver's Python "
                    f"{driver.python_version}; Ray needs one Python version (drop --python)"
                )
            python = inputs.python or driver.python_version
            if inputs.project is None:
                reqs = raydriver.add_to_requirements(reqs, driver)
        interp = interpreters.check_supported(interpreters.find(python, requires))
        self.store.ensure()
        policy = inputs.build_policy or self.store.config().build_policy
        indexes = dataclasses.replace(indexes, no_build=policy == "wheels-only")
        self._indexes = indexes  # their credentials serve this process's builds too
        interp = capture.ensure_captured(self.store, interp, self.host, self.progress)
        if inputs.project is not None:
            uv.check_lock(self.store, inputs.project, interp)
            if driver is not None and files is not None:
                locked = dict(spec.locked_packages(files.lock)).get("ray")
                if locked != driver.ray_version:
                    raise BadInput(
                        f"{inputs.project} locks ray {locked or '(none)'} but the Ray driver "
                        f"runs {driver.ray_version}; require {driver.requirement} in it"
                    )
        if files is None:
            source = str(inputs.requirements_file)
            key = spec.input_key(reqs, interp, indexes)
            known = None if inputs.upgrade else self.store.input_lookup(key)
            if known is not None and (self.store.spec_dir(known) / "spec.json").exists():
                spec.check_hashes(self.store.spec_files(known)[1], hashes, source)
                return Resolved(known, interp)
            files = self._lock(reqs, interp, inputs.upgrade, indexes)
            spec.check_hashes(files.lock, hashes, source)
        with contextlib.ExitStack() as stack:
            wheel = None
            if inputs.install_project and inputs.project is not None:
                self._say(f"building {inputs.project} into a wheel (--install-project)")
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.store.staging)))
                wheel = uv.build_project_wheel(self.store, inputs.project, interp, out)
                with open(wheel, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                selection = selection.model_copy(
                    update={"project_wheel": wheel.name, "project_wheel_sha256": digest}
                )
            sid = spec.snapshot_id(files, interp, selection)
            info = SpecInfo(
                snapshot_id=sid,
                kind="project" if inputs.project is not None else "requirements",
                requirements=reqs,
                source=str(inputs.project or inputs.requirements_file or "") or None,
                interpreter=interp,
                lock_sha256=spec.lock_digest(files.lock),
                created=node_time(),
                host=self.host,
                selection=selection,
                index_url=indexes.default,
                extra_index_urls=list(indexes.extra),
            )
            if self.store.write_spec(info, files.pyproject, files.lock, wheel):
                # every node's index learns it from the feed: where new locks start from
                spec_line = info.model_dump(mode="json")
                self.store.audit("spec_written", self.host, sid, spec=spec_line)
            self.index.remember_spec(info)
        if inputs.project is None:
            self.store.input_record(key, sid)
        return Resolved(sid, interp)

    def _lock(
        self, reqs: list[str], interp: Interpreter, upgrade: bool, indexes: spec.Indexes
    ) -> spec.ProjectFiles:
        """Lock a new requirement list, starting from the most similar known lock.

        Where the list adds or changes only exact pins, uv's cache alone can resolve it
        (no index round trips); anything else, and ``--upgrade``, asks the index.
        """
        what = f"{len(reqs)} requirement(s) with uv for Python {interp.version}"
        near = (
            None
            if upgrade or interp.digest is None
            else self._nearest(reqs, interp.digest, indexes)
        )
        if near is None:
            self._say(f"locking {what}")
            return uv.lock_requirements(self.store, reqs, interp, indexes=indexes)
        info, seed = near
        new = set(reqs) - set(info.requirements)
        offline = all(spec.is_exact_pin(r) for r in new)
        shared = len(reqs) - len(new)
        self._say(
            f"locking {what}, from the lock of {info.snapshot_id[:12]} ({shared} in common)"
            + (", from uv's cache first" if offline else "")
        )
        return uv.lock_requirements(
            self.store, reqs, interp, seed=seed, offline_first=offline, indexes=indexes
        )

    def _nearest(
        self, reqs: list[str], digest: str, indexes: spec.Indexes
    ) -> tuple[SpecInfo, str] | None:
        """The most similar known requirement-list spec and its lock: an index lookup (a
        scan of the store's specs only for stores whose logs never named one)."""
        found = self.index.nearest_spec(reqs, digest, (indexes.default, list(indexes.extra)))
        if found is False:
            return self.store.nearest_spec(reqs, digest, (indexes.default, list(indexes.extra)))
        if not isinstance(found, SpecInfo):
            return None
        try:
            return found, (self.store.spec_dir(found.snapshot_id) / "uv.lock").read_text()
        except FileNotFoundError:
            return None

    # -- bindings -------------------------------------------------------------------------

    def bind_inputs(
        self, workflow: str, node: str, inputs: Inputs, reason: str = "", build: bool = True
    ) -> tuple[Revision, bool]:
        """`envfs build`/`bind` and ``POST /envs``: resolve the spec, build it now (``build``)
        or leave it to first access, append a revision. Returns the revision and whether
        the snapshot was built already (reused)."""
        resolved = self.resolve(inputs)
        reused = self.store.snapshot_ready(resolved.snapshot_id)
        with self.store.gc_fence():  # no sweep between building a snapshot and binding it
            if build:
                self.ensure_built(resolved.snapshot_id)
            return self.bind(workflow, node, resolved.snapshot_id, reason), reused

    # -- interpreters ---------------------------------------------------------------------

    def add_interpreter(self, request: str | None) -> InterpreterInfo:
        """Capture a local interpreter (version or path) into the store, if it is not yet."""
        interp = interpreters.find(request)
        self.store.ensure()
        captured = capture.ensure_captured(self.store, interp, self.host, self.progress)
        assert captured.digest is not None
        return self.store.read_interpreter(captured.digest)

    def list_interpreters(self) -> list[InterpreterUse]:
        """Every captured interpreter, with the bindings whose current snapshot runs it."""
        users: dict[str, list[str]] = {}
        for view in self.index.all_bindings():
            try:
                digest = self.store.read_spec(view.snapshot_id).interpreter.digest
            except NotFound:
                continue
            if digest is not None:
                users.setdefault(digest, []).append(f"{view.workflow}/{view.node}")
        out = []
        for digest in self.store.interpreter_digests():
            info = self.store.read_interpreter(digest)
            fields = info.model_dump(include=set(InterpreterUse.model_fields) - {"envs"})
            out.append(InterpreterUse(**fields, envs=sorted(users.get(digest, []))))
        return out

    # -- garbage collection ---------------------------------------------------------------

    def gc(
        self, keep: int, min_age: float, quarantine: float, dry_run: bool, walk: bool = False
    ) -> GcReport:
        """Sweep what nothing keeps. Which revisions each binding has comes from the node's
        index where it knows for certain (caught up under the gc fence), else from the
        binding's files; ``walk``: from the files for every binding."""
        from envfs.store import gc

        def view() -> gc.IndexView:
            if walk:
                return gc.IndexView(known=self._known_revision)
            self.index.follow_changes()
            return gc.IndexView(self.index.settled_bindings(), self._known_revision)

        self.require_store()
        return gc.collect(
            self.store,
            self.host,
            keep=keep,
            min_age=min_age,
            quarantine=quarantine,
            dry_run=dry_run,
            say=self._say,
            uv=uv.uv_binary(),
            uv_env=uv.uv_env(self.store),
            index=view,
        )

    def _known_revision(self, workflow: str, node: str, number: int) -> str | None:
        """gc's shortcut: the snapshot of a revision the index has (the files it came from,
        or their log lines: a revision never changes and its number is never reused)."""
        view = self.index.at_revision(workflow, node, number)
        return None if view is None else view.snapshot_id

    # -- checking and measuring the store ---------------------------------------------------

    def verify(self, target: str | None = None) -> VerifyReport:
        """Check snapshots against their manifests: all of them (and bindings whose snapshot
        is gone, and uv's cache) without ``target``; else one binding's or one id's."""
        from envfs.store import verify

        self.require_store()
        if target is None:
            ids = self.store.snapshot_ids()
        elif "/" in target:
            ids = [self.show(*parse_target(target)).snapshot_id]
        else:
            ids = [i for i in self.store.snapshot_ids() if i.startswith(target)] or [target]
        damaged = {}
        for i, sid in enumerate(ids, 1):
            self._say(f"verifying snapshot {i}/{len(ids)}: {sid[:12]}")
            problems = verify.snapshot_problems(self.store, sid)
            if problems:
                damaged[sid] = problems
        if target is not None:
            return VerifyReport(checked=len(ids), damaged=damaged)
        built = {e.snapshot_id for e in self.store.events() if e.event == "built"}
        gone = [
            f"{v.workflow}/{v.node}@{v.revision}: snapshot {v.snapshot_id[:12]} is gone"
            for v in self.index.all_bindings()
            if v.snapshot_id in built and not self.store.snapshot_ready(v.snapshot_id)
        ]
        self._say("verifying the bindings' revision files")
        corrupt = verify.corrupt_records(self.store)
        self._say("verifying uv's cache against the wheels' RECORDs")
        checked, cache = verify.uv_cache_problems(self.store)
        return VerifyReport(
            checked=len(ids), damaged=damaged, gone=gone, uv_cache_checked=checked, uv_cache=cache,
            corrupt=corrupt,
        )  # fmt: skip

    def disk_usage(self) -> DiskUsage:
        """Real bytes of the snapshots, each hardlinked file counted once."""
        self.require_store()
        seen: set[tuple[int, int]] = set()
        per: dict[str, dict[str, int]] = {}
        real = disk = 0
        for sid in self.store.snapshot_ids():
            apparent = new = 0
            for _path, st in regular_files(self.store.snapshot_dir(sid)):
                apparent += st.st_size
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    new += st.st_size
                    disk += st.st_blocks * 512
            real += new
            per[sid] = {"apparent_bytes": apparent, "new_bytes": new}
        cache_extra = sum(
            st.st_size
            for _path, st in regular_files(self.store.uv_cache)
            if (st.st_dev, st.st_ino) not in seen
        )
        return DiskUsage(
            snapshots=len(per),
            real_bytes=real,
            disk_bytes=disk,
            apparent_bytes=sum(p["apparent_bytes"] for p in per.values()),
            uv_cache_extra_bytes=cache_extra,
            per_snapshot=per,
        )

    # -- reading --------------------------------------------------------------------------

    def show(self, workflow: str, node: str, revision: int | None = None) -> EnvInfo:
        view = (
            self.index.current(workflow, node)
            if revision is None
            else self.index.at_revision(workflow, node, revision)
        )
        if view is None:
            # the index may lag another node's writes: ask the store once
            revisions = self.store.revisions(workflow, node)
            if revisions:
                self.index.put_binding(revisions)
                view = (
                    self.index.current(workflow, node)
                    if revision is None
                    else self.index.at_revision(workflow, node, revision)
                )
        if view is None:
            what = f"{workflow}/{node}" + ("" if revision is None else f"@{revision}")
            raise NotFound(f"no binding {what}; see `envfs ls`")
        return self.describe(view)

    def packages(self, snapshot_id: str) -> list[tuple[str, str]]:
        """(name, version) of the packages a snapshot has installed, or, before it is built,
        of those its lock names (every extra and group a project locks: a superset)."""
        if self.store.snapshot_ready(snapshot_id):
            root = self.store.snapshot_dir(snapshot_id)
            found = set()
            for site in root.glob("lib/python*/site-packages"):
                for dist in site.glob("*.dist-info"):
                    name, _, version = dist.name.removesuffix(".dist-info").partition("-")
                    found.add((spec.project_name(name), version))
            return sorted(found)
        _pyproject, lock = self.store.spec_files(snapshot_id)
        return spec.locked_packages(lock)

    def describe(self, view: BindingView) -> EnvInfo:
        state, reason = self.state(view.snapshot_id)
        info = self.index.spec(view.snapshot_id)
        if info is None:
            try:
                info = self.store.read_spec(view.snapshot_id)
            except NotFound:
                pass
            else:
                self.index.remember_spec(info)
        interp = info.interpreter if info is not None else None
        return EnvInfo(
            workflow=view.workflow,
            node=view.node,
            revision=view.revision,
            snapshot_id=view.snapshot_id,
            state=state,
            snapshot_path=str(self.store.snapshot_dir(view.snapshot_id)),
            python=interp.version if interp is not None else "unknown",
            layout="venv" if interp is not None and interp.digest is None else "self-contained",
            reason=reason,
            selection=info.selection.describe() if info is not None else None,
            index_url=info.index_url if info is not None else None,
        )

    def binding_views(self, workflow: str | None = None) -> list[BindingView]:
        """Every binding's current revision (of ``workflow`` only, if given: its nodes,
        not a filter over every binding), from the index."""
        if workflow is None:
            return self.index.all_bindings()
        views = (self.index.current(workflow, node) for node in self.index.nodes(workflow))
        return [v for v in views if v is not None]

    def list_envs(self, workflow: str | None = None) -> list[EnvInfo]:
        return [self.describe(v) for v in self.binding_views(workflow)]
