"""The ``imag`` command: serve, import, verify, stats, jobs, worker, db and config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from archive.commandline import load
from archive.config import Config, ConfigError, all_settings, load_config
from archive.index import Database, current_version, open_database, upgrade

log = logging.getLogger("imag")


_load = load


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- commands ----------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    shown = config.masked()
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    for s in all_settings():
        print(
            f"{s.path:<26} = {shown[s.path]!r:<40} # {config.sources.get(s.path, 'default')},"
            f" {s.env}"
        )
    return 0


def cmd_config_cluster(args: argparse.Namespace) -> int:
    """The cluster's view of the cluster-wide settings beside this file's, and
    the nodes: what a node refusing to start compared itself with."""
    from archive import cluster

    config = _load(args)
    db = _open_index(config)
    try:
        theirs = cluster.published(db)
        known = cluster.nodes(db)
        now = db.clock.now()
    finally:
        db.close()
    mine = cluster.settings_digests(config)
    if args.json:
        print(
            json.dumps(
                {
                    "settings": {
                        key: {
                            "cluster": json.loads(theirs[key][1]) if key in theirs else None,
                            "this_file": json.loads(mine[key][1]) if key in mine else None,
                            "same": theirs.get(key, ("",))[0] == mine.get(key, ("",))[0],
                        }
                        for key in sorted(set(theirs) | set(mine))
                    },
                    "nodes": [
                        {
                            "name": n.name,
                            "live": n.live(now),
                            "last_seen": n.last_seen.isoformat(),
                            "config_digest": n.config_digest,
                        }
                        for n in known
                    ],
                },
                indent=2,
            )
        )
        return 0
    for key in sorted(set(theirs) | set(mine)):
        same = theirs.get(key, ("",))[0] == mine.get(key, ("",))[0]
        line = f"{'  ' if same else '!='} {key}"
        if not same:
            line += f"\n     cluster:   {theirs[key][1] if key in theirs else '(unset)'}"
            line += f"\n     this file: {mine[key][1] if key in mine else '(unset)'}"
        print(line)
    for n in known:
        state = "live" if n.live(now) else ("stopped" if n.stopped_at else "not seen lately")
        print(f"node {n.name:<30} {state:<16} last seen {n.last_seen.isoformat()}")
    return 0


def cmd_config_publish(args: argparse.Namespace) -> int:
    """Make this file's cluster-wide settings the cluster's (a rolling change)."""
    from archive import cluster

    config = _load(args)
    db = _open_index(config)
    try:
        changed = cluster.publish(db, config)
    finally:
        db.close()
    if changed:
        print(f"published: {', '.join(changed)} changed; restart the nodes one by one")
    else:
        print("published: the cluster already runs these settings")
    return 0


def _open_index(config: Config) -> Database:
    """The index of ``config``, brought to the current schema."""
    db = open_database(config.index_url)
    upgrade(db)
    return db


def cmd_plugins(args: argparse.Namespace) -> int:
    from archive import plugins

    shown = plugins.describe()
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    for name, hooks in shown.items():
        print(f"{name:<28} {', '.join(hooks)}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    config = _load(args)
    db = open_database(config.index_url)
    applied = upgrade(db)
    print(
        f"index at schema version {current_version(db)}"
        + (f" (applied {', '.join(applied)})" if applied else " (already current)")
    )
    db.close()
    return 0


def cmd_db_reindex_attributes(args: argparse.Namespace) -> int:
    """Fill the extra attribute side tables (``index.extra_attributes``) from
    the stored objects: for instances stored before an attribute was
    configured.  Idempotent, one transaction per batch of series."""
    from archive.index.extra import reindex
    from archive.query import extra_attributes
    from archive.retrieve import StoredObject, UnreadableObject, open_header
    from archive.runtime import Archive
    from storage import StorageError

    config = _load(args)
    with Archive(config, writer=False) as archive:
        extras = extra_attributes(config)
        if not extras:
            print("index.extra_attributes lists no attribute: nothing to index")
            return 0
        per_instance = bool(extras.at("IMAGE"))
        total = archive.catalog.counts()["instances" if per_instance else "series"]
        bar = tqdm(total=total, unit="object", desc="reindex", disable=args.quiet)

        def read(key: str, size: int):  # noqa: ANN202 - a pydicom Dataset or None
            item = StoredObject("", "", "", "", "", key, size)
            try:
                with open_header(archive.store, item) as header:
                    return header.dataset
            except (UnreadableObject, StorageError, OSError) as exc:
                log.warning("stored object unreadable", extra={"key": key, "error": str(exc)})
                return None

        done = reindex(archive.db, extras, read, progress=bar.update)
        bar.close()
    print(
        f"indexed {', '.join(e.keyword for e in extras)}: {done.series} series, "
        f"{done.instances} objects read, {done.values} values"
        + (f", {done.unreadable} unreadable (see the log)" if done.unreadable else "")
    )
    return 1 if done.unreadable else 0


def cmd_import(args: argparse.Namespace) -> int:
    from archive.importer import iter_files, run_import
    from archive.runtime import Archive

    config = _load(args)
    for p in args.paths:
        if not Path(p).exists():
            print(f"imag import: {p}: no such file or folder", file=sys.stderr)
            return 1
    total = None if args.no_count else sum(1 for _ in iter_files(args.paths))
    bar = tqdm(total=total, unit="file", desc="import", disable=args.quiet, dynamic_ncols=True)

    def on_result(path: str, result) -> None:  # noqa: ANN001 - IngestResult
        bar.update(1)
        if result.outcome is None and not args.quiet:
            bar.write(f"rejected {path}: {result.reason}")

    started = time.monotonic()
    with Archive(config) as archive:
        summary = run_import(
            archive, args.paths, site=args.site, workers=args.workers, on_result=on_result
        )
    bar.close()
    elapsed = time.monotonic() - started
    if args.json:
        out = summary.as_dict() | {
            "seconds": round(elapsed, 3),
            "rejections": [{"path": p, "code": c, "reason": r} for p, c, r in summary.rejected],
        }
        print(json.dumps(out, indent=2))
    else:
        d = summary.as_dict()
        rate = d["files"] / elapsed if elapsed else 0
        print(
            f"{d['files']} files in {elapsed:.1f} s ({rate:.0f}/s): {d['stored']} stored "
            f"({_human(d['bytes_stored'])}), {d['duplicate']} already stored, "
            f"{d['replaced']} replaced, {d['conflict_kept']} conflicting (stored copy kept), "
            f"{d['rejected']} rejected"
        )
        for code, n in sorted(d["rejected_by_code"].items()):
            print(f"  rejected {code}: {n}")
    return 2 if summary.rejected else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from archive.runtime import Archive
    from archive.verify import verify

    config = _load(args)
    with Archive(config, writer=False) as archive:
        counts = archive.catalog.counts()
        bars = {
            "objects": tqdm(
                total=counts["instances"],
                unit="obj",
                desc="verify objects",
                disable=args.quiet,
                dynamic_ncols=True,
            ),
            "orphans": tqdm(
                unit="key", desc="look for orphans", disable=args.quiet, dynamic_ncols=True
            ),
        }
        report = verify(
            archive.catalog,
            archive.store,
            repair=args.repair,
            progress=lambda phase: bars[phase].update(1),
        )
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for uid in report.missing:
            print(f"missing object: instance {uid}")
        for uid in report.corrupt:
            print(f"corrupt object (SHA-256 differs): instance {uid}")
        for key in report.orphans:
            print(f"orphaned object (no index row): {key}" + (" - deleted" if args.repair else ""))
        print(
            f"{report.checked} objects checked: {report.ok} ok, {len(report.missing)} missing, "
            f"{len(report.corrupt)} corrupt, {len(report.orphans)} orphaned"
            + (f"; {report.repaired} repaired" if args.repair else "")
        )
        if not report.clean and not args.repair:
            print(
                "run 'imag verify --repair' to delete orphans and mark missing and corrupt "
                "instances (re-send or re-import them to restore)"
            )
    return 0 if report.clean else 1


def cmd_transcode(args: argparse.Namespace) -> int:
    from archive.ingest import POLICY_TARGETS
    from archive.reencode import reencode
    from archive.runtime import Archive

    config = _load(args)
    with Archive(config, writer=False) as archive:
        total = None
        target = POLICY_TARGETS.get(args.to or "") if args.to else None
        if target is None and not config["sites"]:
            target = POLICY_TARGETS.get(config["store_as"])
        if target is not None:
            total = archive.db.scalar(
                "SELECT COUNT(*) FROM instances WHERE stored_ts <> ? AND integrity = 'ok'",
                (target,),
            )
        elif not args.to and config["store_as"] == "as-received" and not config["sites"]:
            print(
                "store_as is as-received and no site has a policy: nothing to convert "
                "(give --to POLICY)"
            )
            return 0
        bar = tqdm(
            total=total, unit="obj", desc="transcode", disable=args.quiet, dynamic_ncols=True
        )

        def done(task, outcome: str) -> None:  # noqa: ANN001 - reencode.Task
            bar.update(1)

        summary = reencode(archive, to=args.to, site=args.site, workers=args.workers, on_done=done)
        bar.close()
    if args.json:
        print(
            json.dumps(
                summary.as_dict()
                | {"failures": [{"sop_instance_uid": u, "reason": r} for u, r in summary.failed]},
                indent=2,
            )
        )
    else:
        saved = summary.bytes_before - summary.bytes_after
        print(
            f"{summary.converted} converted ({_human(summary.bytes_before)} -> "
            f"{_human(summary.bytes_after)}, {_human(saved)} saved), "
            f"{summary.skipped_lossy} lossy left as received, {len(summary.failed)} failed"
        )
        for uid, reason in summary.failed:
            print(f"  failed {uid}: {reason}")
    return 1 if summary.failed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from archive.index import Catalog

    db = _open_index(_load(args))
    stats = Catalog(db).stats()
    db.close()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"patients  {stats['patients']:>12,}")
    print(f"studies   {stats['studies']:>12,}")
    print(f"series    {stats['series']:>12,}")
    print(f"instances {stats['instances']:>12,}")
    print(f"bytes     {stats['bytes']:>12,}  ({_human(stats['bytes'])})")
    if stats["by_site"]:
        print("\nby site:")
        for site, s in stats["by_site"].items():
            print(
                f"  {site or '(none)':<20} {s['studies']:>9,} studies {s['instances']:>12,} "
                f"instances {_human(s['bytes']):>10}"
            )
    if stats["by_modality"]:
        print("\nby modality:")
        for mod, s in stats["by_modality"].items():
            print(
                f"  {mod or '(none)':<20} {s['series']:>9,} series  {s['instances']:>12,} "
                f"instances {_human(s['bytes']):>10}"
            )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from archive.app.serve import serve

    return serve(_load(args))


def _queue(args: argparse.Namespace):  # noqa: ANN202 - (Database, JobQueue)
    from archive.jobs import JobQueue

    db = _open_index(_load(args))
    return db, JobQueue(db)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    db, queue = _queue(args)
    try:
        jobs = queue.list(state=args.state, kind=args.kind, limit=args.limit)
        depth = queue.depth()
    finally:
        db.close()
    if args.json:
        print(json.dumps({"jobs": [j.as_dict() for j in jobs], "depth": depth}, indent=2))
        return 0
    for j in jobs:
        line = (
            f"{j.id:>8} {j.state:<9} {j.kind:<24} {j.attempts:>2}/{j.max_attempts:<2} "
            f"due {j.due_at.isoformat(timespec='seconds')}"
        )
        if j.worker:
            line += f" worker {j.worker}"
        if j.last_error:
            error = j.last_error.replace("\n", " ")
            line += f"  last error: {error[:120]}"
        print(line)
    print(", ".join(f"{n} {state}" for state, n in depth.items()))
    return 0


def _job_action(args: argparse.Namespace, verb: str, done: str) -> int:
    """Apply JobQueue.<verb> to job ``args.id``; print ``done`` or the reason it cannot."""
    from archive.jobs import JobError

    db, queue = _queue(args)
    try:
        getattr(queue, verb)(args.id)
    except JobError as exc:
        print(f"imag jobs {verb}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"job {args.id} {done}")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    return _job_action(args, "retry", "pending again, due now")


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    return _job_action(args, "cancel", "cancelled")


def cmd_worker(args: argparse.Namespace) -> int:
    from archive.app.worker import run_worker_process

    config = _load(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    return run_worker_process(
        config,
        kinds=kinds,
        concurrency=args.concurrency,
        poll_interval=args.poll_interval,
        lease_seconds=(
            config["jobs.lease_seconds"] if args.lease_seconds is None else args.lease_seconds
        ),
        metrics_port=args.metrics_port,
    )


# -- argument parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imag",
        description="IMAG regional imaging archive",
        epilog="Every setting can also be given as an IMAG_* environment variable; "
        "'imag config show' lists them.",
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get(CONFIG_VARIABLE) or None,
        help=f"TOML config file, before or after the command (default: ${CONFIG_VARIABLE}, "
        "else none: built-in defaults + environment)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the archive (HTTP: /health, /metrics, services)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="import files and folders of DICOM objects")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--site", default="", help="producing site to record (default: ingest.default_site)"
    )
    p.add_argument("--workers", type=int, default=0, help="parallel workers (default: CPUs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no per-file lines")
    p.add_argument(
        "--no-count",
        action="store_true",
        help="do not count files first (progress without a total)",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("verify", help="re-hash stored objects against the index; find orphans")
    p.add_argument(
        "--repair", action="store_true", help="delete orphans, mark missing and corrupt instances"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "transcode",
        help="re-encode stored objects to the storage policy (resumable; lossless, verified)",
    )
    p.add_argument(
        "--to",
        choices=["htj2k-lossless", "j2k-lossless", "jpegls-lossless", "rle-lossless"],
        help="target for every instance (default: each site's store_as policy)",
    )
    p.add_argument("--site", help="only this producing site's instances")
    p.add_argument("--workers", type=int, default=0, help="parallel workers (default: CPUs)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_transcode)

    p = sub.add_parser("stats", help="patients, studies, series, instances, bytes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    jobs = sub.add_parser("jobs", help="the job queue: list (default), retry, cancel")
    jobsub = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")
    listing = jobsub.add_parser("list", help="list jobs, newest first")
    for target, defaults in ((jobs, (None, None, 100, False)), (listing, None)):
        # "imag jobs" has the defaults; "imag jobs list" SUPPRESSes its own so it
        # keeps what "imag jobs" parsed
        state, kind, limit, as_json = defaults or (argparse.SUPPRESS,) * 4
        target.add_argument(
            "--state", choices=["pending", "running", "done", "dead", "cancelled"], default=state
        )
        target.add_argument("--kind", default=kind)
        target.add_argument("--limit", type=int, default=limit)
        target.add_argument("--json", action="store_true", default=as_json)
        target.set_defaults(func=cmd_jobs_list)
    p = jobsub.add_parser("retry", help="a dead or cancelled job: pending again, due now")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_jobs_retry)
    p = jobsub.add_parser("cancel", help="cancel a pending job")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_jobs_cancel)

    p = sub.add_parser(
        "worker", help="run jobs until SIGTERM (scale-out beside imag serve's own workers)"
    )
    p.add_argument("--kinds", help="comma-separated job kinds (default: every kind handled here)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once (threads)")
    p.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between polls when idle"
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="lease of a claimed job, renewed while it runs; a dead worker's job is "
        "reclaimed after it (default: jobs.lease_seconds, 60)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port (default: worker.metrics_port; 0: none)",
    )
    p.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="index database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    p = dbsub.add_parser("upgrade", help="apply pending schema migrations")
    p.set_defaults(func=cmd_db_upgrade)
    p = dbsub.add_parser(
        "reindex-attributes",
        help="index the extra attributes (index.extra_attributes) of the stored objects",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_db_reindex_attributes)

    from archive import plugins

    plugins.hook().imag_commands(subparsers=sub)

    p = sub.add_parser(
        "plugins", help="the plugins loaded, core first, and the hooks each implements"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    cfg = sub.add_parser("config", help="configuration")
    cfgsub = cfg.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    p = cfgsub.add_parser("show", help="print the effective configuration (secrets masked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)
    p = cfgsub.add_parser(
        "cluster", help="the cluster-wide settings the nodes run beside this file's, and the nodes"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_cluster)
    p = cfgsub.add_parser(
        "publish", help="make this file's cluster-wide settings the cluster's (rolling change)"
    )
    p.set_defaults(func=cmd_config_publish)
    _config_everywhere(sub)
    return parser


#: the environment variable naming the config file when --config is not given
CONFIG_VARIABLE = "IMAG_CONFIG"


def _config_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """Accept ``--config FILE`` after the command too (``imag serve --config
    imag.toml``, ``imag jobs list -c imag.toml``), on every sub-command the
    core's and the plugins' alike, at any depth.  Its default is SUPPRESS: a
    sub-command without it keeps what the main parser read (the option before
    the command, or $IMAG_CONFIG)."""
    for parser in set(subparsers.choices.values()):
        taken = {option for action in parser._actions for option in action.option_strings}
        if "--config" not in taken:
            parser.add_argument(
                *(["--config"] if "-c" in taken else ["--config", "-c"]),
                metavar="FILE",
                default=argparse.SUPPRESS,
                help="TOML config file (as before the command)",
            )
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _config_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"imag: configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG
    except KeyboardInterrupt:
        print("imag: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `imag config show | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
