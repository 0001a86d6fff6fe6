"""An IMAG plugin, as a service writer would write one: every hook it uses is
declared with ``@hookimpl`` and nothing in ``archive/`` knows about it."""

from __future__ import annotations

import argparse
import json
from importlib import resources

from aiohttp import web

from archive.commandline import load
from archive.config import Setting, as_int, as_text
from archive.events import Event, Subscriber
from archive.hookspecs import hookimpl
from archive.index import open_database
from archive.index.migrate import Migrations
from archive.jobs import JobQueue
from archive.security.http import require
from archive.web import ARCHIVE


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting("example.greeting", "bonjour", as_text, "what GET /example/hello says"),
        Setting("example.repeat", 1, as_int(1, 10), "how many times it says it"),
    ]


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("example", resources.files("imag_example").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    return {"example.read": "read the example plugin's greeting and counters"}


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    return {"radiologist": ["example.read"]}


@require("example.read", "example.hello")
async def hello(request: web.Request) -> web.Response:
    archive = request.app[ARCHIVE]
    runs = archive.db.query("SELECT seq, runs FROM example_deliveries ORDER BY seq")
    return web.json_response(
        {
            "greeting": " ".join(
                [archive.config["example.greeting"]] * archive.config["example.repeat"]
            ),
            "deliveries": {str(seq): n for seq, n in runs},
        }
    )


@hookimpl
def imag_routes(app: web.Application) -> None:
    app.router.add_get("/example/hello", hello)


def touch(archive, payload: dict) -> None:  # noqa: ANN001 - a job handler
    archive.db.execute("INSERT INTO example_touches (note) VALUES (?)", (payload["note"],))


@hookimpl
def imag_job_kinds() -> dict:
    return {"example.touch": touch}


def cmd_example(args: argparse.Namespace) -> int:
    config = load(args)
    db = open_database(config.index_url)
    try:
        if args.touch:
            with db.transaction():
                JobQueue(db).enqueue("example.touch", {"note": args.touch})
        touches = [r[0] for r in db.query("SELECT note FROM example_touches ORDER BY id")]
        runs = db.query("SELECT seq, runs FROM example_deliveries ORDER BY seq")
        print(json.dumps({"touches": touches, "deliveries": {str(s): n for s, n in runs}}))
    finally:
        db.close()
    return 0


@hookimpl
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("example", help="the example plugin: enqueue a touch, show counters")
    p.add_argument("--touch", metavar="NOTE", help="enqueue an example.touch job")
    p.set_defaults(func=cmd_example)


def count(archive, event: Event) -> None:  # noqa: ANN001 - Archive
    # deliberately not idempotent on its own: exactly once is the platform's job
    archive.db.execute(
        "INSERT INTO example_deliveries (seq, study_uid, runs) VALUES (?, ?, 1) "
        "ON CONFLICT (seq) DO UPDATE SET runs = example_deliveries.runs + 1",
        (event.seq, event.study_uid),
    )


@hookimpl
def imag_event_subscribers() -> list[Subscriber]:
    return [Subscriber("example-counter", ("study.stable",), count)]
