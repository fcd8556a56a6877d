"""``scrapy queue REDIS_URL``: what a shared queue holds, and its merged records.

    scrapy queue redis://host:6379/0                       # waiting, in flight, done, failed, dead-lettered
    scrapy queue redis://host:6379/0 --manifest all.jsonl  # every URL's current record, whichever worker wrote it
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from fetcher.logs import redact_log_records
from fetcher.queue.stream import (
    QueueUnavailable,
    RedisQueue,
    is_queue_url,
    parse_queue_url,
)
from fetcher.store.records import MANIFEST_FIELDS

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)


class Command(ScrapyCommand):
    requires_crawler_process = False

    def syntax(self) -> str:
        return "REDIS_URL [--manifest FILE]"

    def short_desc(self) -> str:
        return "Show a shared queue's state, or write the merged records of its URLs"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument("--manifest", metavar="FILE",
                            help="write every URL's current record (manifest format, JSON Lines) to FILE")

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        redact_log_records()  # no crawl here, so no add-on to do it
        if len(args) != 1 or not is_queue_url(args[0]):
            raise UsageError("give a queue: scrapy queue redis://host:6379/0[?queue=NAME] [--manifest FILE]")
        try:
            parse_queue_url(args[0])
        except ValueError as exc:
            raise UsageError(str(exc), print_help=False) from exc
        queue = RedisQueue(args[0])
        try:
            if opts.manifest:
                count = _write_manifest(queue, Path(opts.manifest))
                print(f"Wrote {count} records to {opts.manifest}", file=sys.stderr)
            else:
                print(_describe(queue))
        except QueueUnavailable as exc:
            logger.error("Cannot use the queue: %s", exc)
            self.exitcode = 1
        finally:
            queue.close()


def _describe(queue: RedisQueue) -> str:
    st = queue.status()
    lines = [f"queue {queue.name}", f"  waiting:        {st.waiting}",
             f"  in flight:      {sum(st.in_flight.values())}"]
    for worker in sorted(set(st.in_flight) | set(st.heartbeats)):
        age = st.heartbeats.get(worker)
        beat = "no heartbeat" if age is None else f"last heartbeat {age:.0f} s ago"
        lines.append(f"    {worker}: {st.in_flight.get(worker, 0)} ({beat})")
    lines += [f"  done:           {st.done}", f"  failed:         {st.failed}", f"  dead-lettered:  {st.dead}"]
    return "\n".join(lines)


def _write_manifest(queue: RedisQueue, path: Path) -> int:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for record in queue.records():  # the manifest's fields, in its order
            f.write(json.dumps({k: record.get(k) for k in MANIFEST_FIELDS}, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
