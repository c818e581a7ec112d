"""Walk a next-URL paginated JSON API with a Python tool people would otherwise
pick, and print one JSON line of figures to compare `tidemark pull` against.

Usage:
    python3 bench/compare.py --tool {dlt,dlt-walk,singer} --url URL_OF_FIRST_PAGE
                             [--records-path data] [--next-path links.next]

Every page body holds its records at --records-path (a dotted path to an
array) and the full URL of the next page at --next-path (a dotted path; null
or missing ends the walk). Tools:

- dlt:      dlt's RESTClient with JSONLinkPaginator, every record written as a
            JSON line to /dev/null with dlt's own JSON encoder (orjson): the
            same work as `pull`.
- dlt-walk: the same walk, only counting records: dlt's paging and parsing
            alone, no output.
- singer:   a Singer SDK (Meltano's singer-sdk) tap with one RESTStream,
            synced with `tap.sync_all()`; its Singer messages go to stdout,
            which is /dev/null here.

Prints, on the real stdout:
    {"tool": ..., "version": ..., "records": N, "pages": P, "seconds": S,
     "peak_rss_kib": K}
`seconds` runs from the first request to the last record written (Python
imports and the tools' set-up excluded; for the Singer tap it ends when
`sync_all()` returns, just after its final STATE message); `peak_rss_kib` is
ru_maxrss.

Fairness choices (each tool is configured as fast as its user could honestly
make it, without switching off what it does by default):

- dlt: the JSONPaths are compiled once and handed to dlt. Given a string,
  JSONLinkPaginator compiles it once, but RESTClient compiles a string
  `data_selector` again on every page. With the jsonpath_ng of an earlier
  install that rebuilt ply's parser tables each time and made dlt about 5x
  slower; jsonpath_ng 1.16.0 (what pip resolves for dlt 1.31.0) ships
  pre-built tables, so a string now costs ~0.2 ms a page (a few per cent),
  but compiled paths remain the fastest configuration a dlt user can choose,
  so that is what is measured.
- dlt: records are written with `dlt.common.json.dumps`, the orjson-backed
  encoder dlt uses itself, about 1.5x faster than the standard library's
  `json.dumps`.
- dlt parses each page body twice (once for the records, once in the
  paginator for the next URL): that is RESTClient's own code, not avoidable
  by a user.
- singer: the SDK defaults stand (type conformance, the catalog's selection
  and identity stream maps, the default simplejson message writer with its
  flush after each message). Only logging is turned down to warnings on
  stderr, so the per-request METRIC lines cost no I/O in the measurement.
  `get_next_url` reads the next URL from `response.json()`, as the SDK's
  documented example and its JSONPathPaginator do, which parses each page a
  second time (as dlt does).

Needs the packages in bench/requirements.txt (bench/setup-python.sh makes a
venv with them and prints its python).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

INSTALL_HINT = "pip install -r bench/requirements.txt (or run bench/setup-python.sh)"


@dataclass
class Walk:
    """What one run did, as the tool itself measured it."""

    tool: str
    package: str
    records: int
    pages: int
    seconds: float


def dig(body: Any, dotted: str) -> Any:
    """The value at a dotted path in a JSON body, or None where it is missing."""
    for key in dotted.split("."):
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def require(module: str, package: str) -> None:
    """Exit with a clear message when the tool's package is not installed."""
    try:
        __import__(module)
    except ImportError as exc:
        sys.exit(f"compare.py: {package} is not installed ({exc}); {INSTALL_HINT}")


def run_dlt(url: str, records_path: str, next_path: str, write: bool) -> Walk:
    """dlt's RESTClient over the pages, writing each record as a JSON line
    to /dev/null, or (write=False) only counting them."""
    require("dlt", "dlt")
    from dlt.common import json as dlt_json
    from dlt.sources.helpers.rest_client import RESTClient
    from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
    from jsonpath_ng import parse

    parts = urlsplit(url)
    # Pre-compiled JSONPaths: RESTClient would compile a string data_selector
    # again on every page (see the module docstring).
    client = RESTClient(
        base_url=f"{parts.scheme}://{parts.netloc}",
        paginator=JSONLinkPaginator(next_url_path=parse(next_path)),
        data_selector=parse(records_path),
    )
    records = pages = 0
    with open(os.devnull, "w", encoding="utf-8") as out:
        started = time.perf_counter()
        for page in client.paginate(url):
            pages += 1
            if not write:
                records += len(page)
                continue
            for rec in page:
                out.write(dlt_json.dumps(rec))
                out.write("\n")
                records += 1
        seconds = time.perf_counter() - started
    tool = "dlt RESTClient" if write else "dlt RESTClient (walk only)"
    return Walk(tool, "dlt", records, pages, seconds)


def run_singer(url: str, records_path: str, next_path: str) -> Walk:
    """A Singer SDK tap with one RESTStream over the pages, run as
    `tap.sync_all()` with its messages on stdout (/dev/null here)."""
    require("singer_sdk", "singer-sdk")
    import requests
    from singer_sdk import RESTStream, Tap
    from singer_sdk import typing as th
    from singer_sdk.helpers.types import Context
    from singer_sdk.pagination import BaseHATEOASPaginator
    from singer_sdk.streams.rest import HTTPRequest, PageContext

    tap_name = "tap-tidemark-bench"
    # Logging down to warnings on stderr so that the SDK's INFO logs and
    # per-request METRIC lines cost no I/O inside the measurement. The
    # metrics logger's level comes from the SDK's own <TAP>_LOGLEVEL knob,
    # read when the tap is constructed.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    os.environ[tap_name.upper().replace("-", "_") + "_LOGLEVEL"] = "WARNING"

    class NextUrlPaginator(BaseHATEOASPaginator):
        """Follows the full URL found at the next path of each page body."""

        def get_next_url(self, response: requests.Response) -> str | None:
            next_url = dig(response.json(), next_path)
            return next_url if isinstance(next_url, str) else None

    class RecordsStream(RESTStream):
        """The paginated records endpoint; url_base, path and the first
        page's query come from the tap's `url` setting."""

        name = "records"
        primary_keys = ("id",)
        replication_key = None
        # The fields of tidemark's mock API records (`status` appears in the
        # static pages of `tidemark bench pull`); the SDK drops, with a
        # warning, any property a record has that the schema lacks.
        schema = th.PropertiesList(
            th.Property("id", th.StringType, required=True),
            th.Property("updated_at", th.DateTimeType),
            th.Property("seq", th.IntegerType),
            th.Property("name", th.StringType),
            th.Property("status", th.StringType),
            th.Property("payload", th.StringType),
        ).to_dict()

        pages = 0
        records = 0
        started = 0.0

        @property
        def url_base(self) -> str:
            parts = urlsplit(self.config["url"])
            return f"{parts.scheme}://{parts.netloc}"

        @property
        def path(self) -> str:  # type: ignore[override]
            return str(urlsplit(self.config["url"]).path)

        @property
        def records_jsonpath(self) -> str:
            return f"$.{self.config['records_path']}[*]"

        def get_new_paginator(self) -> NextUrlPaginator:
            return NextUrlPaginator()

        def get_http_request(self, *, page: PageContext) -> HTTPRequest:
            request = super().get_http_request(page=page)
            if page.next_page_token:
                request.url = page.next_page_token.geturl()
            else:
                request.params = dict(parse_qsl(urlsplit(self.config["url"]).query))
            return request

        def get_records(self, context: Context | None) -> Iterable[dict[str, Any]]:
            # The first request is made when this generator first advances.
            self.started = time.perf_counter()
            yield from super().get_records(context)

        def parse_response(
            self, response: requests.Response
        ) -> Iterable[dict[str, Any]]:
            self.pages += 1
            yield from super().parse_response(response)

        def post_process(
            self, row: dict[str, Any], context: Context | None = None
        ) -> dict[str, Any]:
            # Every record is selected (the SDK's default catalog), so each
            # one that passes here becomes a RECORD message.
            self.records += 1
            return row

    class BenchTap(Tap):
        """One stream: the records behind the `url` setting."""

        name = tap_name
        config_jsonschema = th.PropertiesList(
            th.Property("url", th.StringType, required=True),
            th.Property("records_path", th.StringType, required=True),
            th.Property("next_path", th.StringType, required=True),
        ).to_dict()

        def discover_streams(self) -> list[RecordsStream]:
            return [RecordsStream(tap=self)]

    tap = BenchTap(
        config={"url": url, "records_path": records_path, "next_path": next_path}
    )
    tap.sync_all()
    ended = time.perf_counter()
    stream = tap.streams["records"]
    assert isinstance(stream, RecordsStream)
    seconds = ended - stream.started
    return Walk("Singer SDK tap", "singer-sdk", stream.records, stream.pages, seconds)


def stdout_to_devnull() -> TextIO:
    """Point fd 1 (and so sys.stdout) at /dev/null; return the real stdout,
    for the summary line. Keeps anything a library prints out of the summary,
    and is where the Singer tap's messages go."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return real


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Walk a next-URL paginated JSON API with dlt or a Singer SDK tap "
        "and print one JSON line of figures.",
    )
    parser.add_argument("--tool", required=True, choices=["dlt", "dlt-walk", "singer"])
    parser.add_argument("--url", required=True, help="URL of the first page")
    parser.add_argument(
        "--records-path", default="data", help="dotted path to the records array"
    )
    parser.add_argument(
        "--next-path", default="links.next", help="dotted path to the next page's URL"
    )
    args = parser.parse_args()

    runners: dict[str, Callable[[], Walk]] = {
        "dlt": lambda: run_dlt(args.url, args.records_path, args.next_path, True),
        "dlt-walk": lambda: run_dlt(args.url, args.records_path, args.next_path, False),
        "singer": lambda: run_singer(args.url, args.records_path, args.next_path),
    }
    real_stdout = stdout_to_devnull()
    walk = runners[args.tool]()
    if walk.records <= 0:
        sys.exit(
            f"compare.py: {walk.tool} read no records from {args.url} "
            f"({walk.pages} pages); check --records-path/--next-path"
        )
    summary = {
        "tool": walk.tool,
        "version": importlib.metadata.version(walk.package),
        "records": walk.records,
        "pages": walk.pages,
        "seconds": walk.seconds,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print(json.dumps(summary), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
