"""Walk the benchmark's static pages with dlt's RESTClient, the way a dlt user
would, and write every record as a JSON line to /dev/null.

Usage: python3 bench/dlt_pull.py URL_OF_FIRST_PAGE [--walk-only]
--walk-only counts the records without writing them (dlt's paging and
parsing alone). Prints one JSON line: {"records": N, "seconds": S, "peak_rss_kib": K}.
Run by `tidemark bench pull --dlt`; needs `pip install dlt`.
"""

import json
import resource
import sys
import time

from dlt.sources.helpers.rest_client import RESTClient
from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator
from jsonpath_ng import parse as jsonpath


def main() -> None:
    url = sys.argv[1]
    walk_only = "--walk-only" in sys.argv[2:]
    base, _, path = url.partition("/pages/")
    # JSONPaths compiled once: given strings, dlt (with jsonpath_ng/ply as
    # installed here) rebuilds its parser tables on every page, which would
    # make dlt several times slower than it can be.
    client = RESTClient(
        base_url=base,
        paginator=JSONLinkPaginator(next_url_path=jsonpath("next")),
        data_selector=jsonpath("data"),
    )
    started = time.perf_counter()
    records = 0
    with open("/dev/null", "w") as out:
        for page in client.paginate("/pages/" + path):
            if walk_only:
                records += len(page)
                continue
            for rec in page:
                out.write(json.dumps(rec))
                out.write("\n")
                records += 1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"records": records, "seconds": seconds, "peak_rss_kib": peak}))


if __name__ == "__main__":
    main()
