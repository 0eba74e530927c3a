"""``srbatch manifest``: summary, failures, show and compact for the people who operate a scheduled job
(the functions of :mod:`srbatch.upscale.ops` on the command line). Exit codes: 0 done, 2 bad arguments, refused, or
nothing to read."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from srbatch.jobkit.cli import ExitCode, run_cli
from srbatch.jobkit.config import fold_storage_options, parse_storage_options, redact

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Inspect and maintain the manifest of the upscale job's OUTPUT prefix (the job's --output: a folder or s3://...).
  summary   one line per run (counts by status, time, throughput) and the state now
  failures  the inputs whose latest outcome is failed (or one run's failed rows with --run)
  show      every row of one input across all runs
  compact   merge old run partitions into one (the latest outcome per input); refused while a run writes"""


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="the job's output prefix (its --output): a folder or s3://...")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 [AWS_ENDPOINT_URL]")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option, repeatable; credentials are best left to the AWS_* variables")
    p.add_argument("--anonymous", action="store_true", help="read/write object storage without credentials")
    p.add_argument("-v", "--verbose", action="store_true", help="log decisions (INFO level)")


def _positive(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return n


def build_parser(prog: str = "srbatch manifest") -> argparse.ArgumentParser:
    """The argument parser of ``srbatch manifest``."""
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="{summary,failures,show,compact}")

    p = sub.add_parser("summary", help="one line per run and the state now",
                       description="One line per run, newest last: run id, start, seconds, total, ok, failed, "
                       "skipped, images/s and how it ended (complete, interrupted, crashed); a run without a run "
                       "record is counted from its manifest parts and marked with *. Then the state: inputs known, "
                       "how many are ok and failed now.")  # fmt: skip
    _storage_flags(p)
    p.add_argument("--last", type=_positive, metavar="N", help="only the newest N runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_summary)

    p = sub.add_parser("failures", help="the inputs whose latest outcome is failed",
                       description="Without --run: the inputs whose latest outcome is failed (from the run state: "
                       "the cost depends on the number of inputs, not on the history), newest first. With --run: the "
                       "failed rows of that run.")  # fmt: skip
    _storage_flags(p)
    p.add_argument("--run", metavar="RUN_ID", help="the failed rows of this run instead")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="rows shown [50]")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the count of rows left out goes to stderr)")
    p.set_defaults(func=_failures)

    p = sub.add_parser("show", help="every row of one input across all runs",
                       description="Every manifest row of INPUT_URI across all runs, oldest first, with the "
                       "partition that holds it, then its latest outcome in the run state.")  # fmt: skip
    _storage_flags(p)
    p.add_argument("input_uri", metavar="INPUT_URI", help="the input as recorded in the manifest (a full URI/path)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_show)

    p = sub.add_parser("compact", help="merge old run partitions into one",
                       description="Merge the run partitions folded into the run state and older than the newest "
                       "--keep-runs into one partition run=compacted-<UTC time> holding, per input, the latest "
                       "outcome row among them (their skipped rows and superseded attempts are dropped; run records "
                       "stay). The new partition is written whole before the old ones are deleted. Runs not folded "
                       "into the state (a killed run's parts) are never touched. Refused while a run writes (an "
                       "active-run marker fresher than --stale-after).")  # fmt: skip
    _storage_flags(p)
    p.add_argument("--keep-runs", type=int, default=10, metavar="K", help="newest runs left as they are [10]")
    p.add_argument("--stale-after", type=float, default=15.0, metavar="MINUTES",
                   help="an active-run marker not refreshed for this long is a killed run's: ignored [15]")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write and delete nothing")
    p.add_argument("--force", action="store_true", help="compact even while an active-run marker is fresh")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_compact)
    return parser


@dataclass(frozen=True)
class _Invocation:
    """Parsed arguments and the fsspec options built from them, as :func:`run_cli` expects of a config."""

    args: argparse.Namespace
    storage_options: dict[str, Any]

    def redacted(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self.args).items() if k != "func"}
        d["storage_options"] = self.storage_options
        return redact(d)


def _invocation(args: argparse.Namespace) -> _Invocation:
    so = fold_storage_options(parse_storage_options(args.storage_option), args.endpoint_url, args.anonymous)
    return _Invocation(args, so)


def main(argv: Sequence[str] | None = None, *, prog: str = "srbatch manifest") -> int:
    """Parse ``argv``, run the command, return its exit code (0 done, 2 bad arguments / refused / nothing to read)."""
    return run_cli(argv, prog=prog, parser=build_parser, make_config=_invocation, run=lambda inv: inv.args.func(inv),
                   logger="srbatch.upscale")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- commands


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=_json_default))


def _summary(inv: _Invocation) -> int:
    from srbatch.upscale.ops import summarize

    s = summarize(inv.args.output, inv.storage_options, last=inv.args.last)
    if inv.args.json:
        _print_json(s.as_dict())
    else:
        print(s.text())
    return ExitCode.OK


def _failures(inv: _Invocation) -> int:
    from srbatch.upscale.ops import failures

    a = inv.args
    f = failures(a.output, inv.storage_options, run=a.run, limit=a.limit)
    if a.json:
        _print_json({"source": f.source, "run": f.run, "total": f.total, "shown": f.rows.num_rows, "more": f.more,
                     "notes": f.notes, "failures": f.rows.to_pylist()})  # fmt: skip
        return ExitCode.OK
    if a.csv:
        import pyarrow.csv as pacsv

        buf = pa.BufferOutputStream()
        pacsv.write_csv(f.rows, buf)
        sys.stdout.write(buf.getvalue().to_pybytes().decode())
        if f.more:
            print(f"{f.more} more failure(s) not shown (--limit {a.limit})", file=sys.stderr)
        return ExitCode.OK
    what = f"run {f.run}" if f.run else "inputs whose latest outcome is failed"
    print(f"srbatch manifest: {a.output}: {f.total} failure(s) ({what}; newest first)")
    for note in f.notes:
        print(f"  note: {note}")
    for r in f.rows.to_pylist():
        when = r["finished_at"].strftime("%Y-%m-%d %H:%M:%S") if r["finished_at"] else "-"
        print(f"  {r['input_uri']}: {r['error_type']}: {r['error_message']}  (run {r['run_id']}, {when})")
    if f.more:
        print(f"  ... and {f.more} more (--limit N to see more, --csv or --json for all columns)")
    return ExitCode.OK


_SHOW = ["partition", "run_id", "status", "finished_at", "output_uri", "error_type", "error_message", "fingerprint",
         "total_s"]  # fmt: skip


def _show(inv: _Invocation) -> int:
    from srbatch.upscale.ops import show

    a = inv.args
    h = show(a.output, a.input_uri, inv.storage_options, columns=None if a.json else _SHOW[1:])
    if a.json:
        _print_json({"input_uri": h.input_uri, "rows": h.rows.to_pylist(), "current": h.current})
        return ExitCode.OK
    print(f"srbatch manifest: {a.input_uri}: {h.rows.num_rows} row(s) in {a.output}, oldest first")
    for r in h.rows.select(_SHOW).to_pylist():
        when = r["finished_at"].strftime("%Y-%m-%d %H:%M:%S") if r["finished_at"] else "-"
        where = f" (partition {r['partition']})" if r["partition"] != r["run_id"] else ""
        detail = (f"{r['error_type']}: {r['error_message']}" if r["status"] == "failed"
                  else f"-> {r['output_uri']}")  # fmt: skip
        secs = f", {r['total_s']:.3f} s" if r["total_s"] is not None and r["status"] == "ok" else ""
        print(f"  {when}  run {r['run_id']}{where}: {r['status']} {detail}{secs} (fingerprint {r['fingerprint']})")
    c = h.current
    if c is None:
        print("  latest outcome in the state: none (not folded into the state yet, or no outcome)")
    else:
        print(f"  latest outcome in the state: {c['status']} in run {c['run_id']} at {c['finished_at']}")
    return ExitCode.OK


def _compact(inv: _Invocation) -> int:
    from srbatch.upscale.ops import compact

    a = inv.args
    r = compact(a.output, inv.storage_options, keep_runs=a.keep_runs, stale_after_minutes=a.stale_after,
                dry_run=a.dry_run, force=a.force)  # fmt: skip
    if a.json:
        _print_json(r.as_dict())
    else:
        print(r.text())
    return ExitCode.OK
