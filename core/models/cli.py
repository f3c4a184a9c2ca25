"""`models` and `cache` commands: list, pull, verify and remove models; show and clean the cache.

Data goes to stdout (tables, or JSON with --json), messages and progress to stderr. Exit codes are
documented in docs/models.md. `add_commands` plugs into run.py's argparse; `python -m core.models.cli`
runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable

from core.errors import BadRequest, Busy, NotFound, SwitchboardError
from core.models.cache import INCOMPLETE, ModelCache, disk_usage
from core.models.manager import ModelManager, parse_repo

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class _Refused(Exception):
    """A destructive command without --force where nobody can confirm it."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `models {list,pull,verify,rm}` and `cache {list,clean}` to a parent parser's subcommands."""
    models = subparsers.add_parser("models", help="list, download, verify and remove local models")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="catalog and cached models with status, size, path, last use")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(sb_command=("models", "list"))
    p = msub.add_parser("pull", help="download a model (resumes an interrupted download)")
    p.add_argument("name", help="hub repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument(
        "--endpoint",
        action="append",
        metavar="URL",
        help="hub endpoint to use instead of models.endpoints (repeat for fallbacks)",
    )
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--refresh", action="store_true", help="ask the hub even if the model is complete")
    p.add_argument("--no-wait", action="store_true", help="fail instead of waiting for another process")
    p.set_defaults(sb_command=("models", "pull"))
    p = msub.add_parser("verify", help="re-hash a model's files (all cached models without NAME)")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(sb_command=("models", "verify"))
    p = msub.add_parser("rm", help="delete a model from the cache")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(sb_command=("models", "rm"))

    cache = subparsers.add_parser("cache", help="disk usage of the model cache; clean up leftovers")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    p = csub.add_parser("list", help="disk usage per model, leftovers and the total")
    p.add_argument("--json", action="store_true")
    p.set_defaults(sb_command=("cache", "list"))
    p = csub.add_parser("clean", help="remove incomplete models and leftovers (.partial dirs, stale locks)")
    p.add_argument("name", nargs="?", help="clean only this model")
    p.add_argument("--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    p.set_defaults(sb_command=("cache", "clean"))


def run(args: argparse.Namespace, settings: object) -> int:
    """Run the command `add_commands` parsed; returns the exit code."""
    handler = _HANDLERS[args.sb_command]
    try:
        return handler(args, settings, ModelCache(settings.model_path))  # type: ignore[attr-defined]
    except _Refused as exc:
        _err(str(exc))
        return EXIT_USAGE
    except BadRequest as exc:
        _err(f"error: {exc.message}")
        return EXIT_USAGE
    except NotFound as exc:
        _err(f"error: {exc.message}")
        return EXIT_NOT_FOUND
    except Busy as exc:
        _err(f"error: {exc.message}")
        return EXIT_BUSY
    except SwitchboardError as exc:
        _err(f"error: {exc.message}")
        return EXIT_INTERRUPTED if exc.code == "cancelled" else EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    print(text, flush=True)


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else None


def _repo(name: str) -> str:
    """Accept `org/name` or the page's `local:org/name`; reject anything that could leave MODEL_DIR."""
    return parse_repo(name)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _confirm(question: str, force: bool) -> bool:
    """True when --force or the user says yes; _Refused when there is no terminal to ask."""
    if force:
        return True
    if not sys.stdin.isatty():
        raise _Refused(f"refusing: {question.rstrip('?')} needs confirmation and stdin is not a terminal; pass --force")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def models_list(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    rows = [
        {
            "model": r["model"],
            "name": r["name"] if r["in_catalog"] else "",
            "status": r["status"],
            "reason": r["reason"],
            "downloading": r["downloading"],
            "size_bytes": r["size_bytes"],
            "path": r["path"],
            "last_used": _when(r["last_used"]),
            "in_catalog": r["in_catalog"],
        }
        for r in ModelManager(cache).listing()["models"]
    ]
    if args.json:
        _out(json.dumps(rows, indent=2))
        return EXIT_OK
    table = [["MODEL", "STATUS", "SIZE", "LAST USED", "PATH"]]
    for r in rows:
        status = r["status"] + (" (downloading)" if r["downloading"] else "")
        table.append(
            [
                r["model"],
                status,
                _human(r["size_bytes"]) if r["size_bytes"] else "-",
                r["last_used"] or "never",
                r["path"],
            ]
        )
    _out(_table(table))
    return EXIT_OK


def models_pull(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    from tqdm import tqdm

    from core.models.downloads import DownloadManager

    repo = _repo(args.name)
    manager = DownloadManager.from_settings(settings, endpoints=args.endpoint, wait_for_lock=not args.no_wait)
    bar: tqdm | None = None

    def on_progress(p: dict) -> None:
        nonlocal bar
        if p.get("state") == "waiting":
            _err(f"{repo} is being downloaded by another process (pid {p.get('holder') or '?'}); waiting for it")
            return
        if bar is None:
            bar = tqdm(
                total=p["total"],
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=repo,
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None,
            )  # None: no bar without a TTY
        bar.total, bar.n = p["total"], p["bytes"]
        bar.set_postfix_str(f"{p['files_done']}/{p['files_total']} files", refresh=False)
        bar.refresh()

    job = manager.start(repo, revision=args.revision, force=args.refresh, on_progress=on_progress)
    try:
        while not job.done.wait(0.25):
            pass
    except KeyboardInterrupt:
        job.cancel()
        job.done.wait(30)
        if bar is not None:
            bar.close()
        _err(f"cancelled; the partial download is kept: run `models pull {repo}` again to resume")
        return EXIT_INTERRUPTED
    if bar is not None:
        bar.close()
    result = job.wait()  # raises the download's error, mapped to an exit code by run()
    if result.already_present:
        _err(f"{repo} is already complete (revision {result.revision}); nothing to download")
    else:
        _err(
            f"downloaded {repo}: {result.files} files, {_human(result.downloaded_bytes)} transferred in "
            f"{result.elapsed:.1f} s from {result.source}"
        )
    _out(result.path)
    return EXIT_OK


def models_verify(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    reports = ModelManager(cache).verify(_repo(args.name) if args.name else None)
    if args.json:
        _out(
            json.dumps(
                [
                    {
                        "model": r.repo_id,
                        "ok": r.ok,
                        "files_checked": r.checked,
                        "path": str(r.path),
                        "problems": r.problems,
                    }
                    for r in reports
                ],
                indent=2,
            )
        )
    else:
        for r in reports:
            _out(f"{'ok' if r.ok else 'PROBLEMS'}  {r.repo_id}  ({r.checked} files checked)")
            for p in r.problems:
                _out(f"    {p['problem']}: {p['path'] or '(model)'}: {p['detail']}")
    bad = [r.repo_id for r in reports if not r.ok]
    if not reports:
        _err("no models in the cache")
    if bad:
        _err(f"{len(bad)} model(s) with problems; `models pull NAME` repairs them: {', '.join(bad)}")
        return EXIT_FAILED
    return EXIT_OK


def models_rm(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    repo = _repo(args.name)
    path = cache.path_for(repo)
    if not path.exists():
        raise NotFound(f"{repo} is not in the cache ({path})")
    if not _confirm(f"remove {repo} ({_human(disk_usage(path))}) at {path}?", args.force):
        _err("aborted; nothing removed")
        return EXIT_FAILED
    freed = ModelManager(cache).delete(repo)["bytes_freed"]
    _err(f"removed {repo}; freed {_human(freed)}")
    return EXIT_OK


def cache_list(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    models = []
    for repo in cache.list_cached():
        status = cache.status(repo)
        models.append(
            {
                "model": repo,
                "status": status.status,
                "reason": status.reason,
                "size_bytes": disk_usage(status.path),
                "path": str(status.path),
            }
        )
    leftovers = [
        {"path": str(x.path), "kind": x.kind, "size_bytes": x.size, "model": x.repo_id} for x in cache.leftovers()
    ]
    total = disk_usage(cache.root)
    if args.json:
        _out(
            json.dumps(
                {"root": str(cache.root), "models": models, "leftovers": leftovers, "total_bytes": total}, indent=2
            )
        )
        return EXIT_OK
    table = [["MODEL", "STATUS", "SIZE", "PATH"]]
    table += [[m["model"], m["status"], _human(m["size_bytes"]), m["path"]] for m in models]
    table += [["(leftover)", x["kind"], _human(x["size_bytes"]), x["path"]] for x in leftovers]
    table.append(["TOTAL", "", _human(total), str(cache.root)])
    _out(_table(table))
    return EXIT_OK


def cache_clean(args: argparse.Namespace, settings: object, cache: ModelCache) -> int:
    if args.name:
        repo = _repo(args.name)
        repos, leftovers = [repo], cache.leftovers(repo)
        if not cache.path_for(repo).exists() and not leftovers:
            raise NotFound(f"{repo} is not in the cache ({cache.path_for(repo)})")
    else:
        repos, leftovers = cache.list_cached(), cache.leftovers()
    doomed = []
    for repo in repos:
        if cache.status(repo).status == INCOMPLETE:
            if cache.is_locked(repo):
                _err(f"skipping {repo}: it is being downloaded")
                continue
            doomed.append(repo)
    leftovers = [x for x in leftovers if x.repo_id not in doomed]
    if not doomed and not leftovers:
        _err("nothing to clean")
        return EXIT_OK
    sizes = {repo: disk_usage(cache.path_for(repo)) for repo in doomed}
    for repo in doomed:
        _err(f"incomplete model  {repo}  {_human(sizes[repo])}  ({cache.status(repo).reason})")
    for x in leftovers:
        _err(f"{x.kind}  {x.path}  {_human(x.size)}")
    total = sum(sizes.values()) + sum(x.size for x in leftovers)
    if args.dry_run:
        _err(f"dry run: would free {_human(total)}")
        return EXIT_OK
    if not _confirm(f"remove these {len(doomed) + len(leftovers)} item(s), {_human(total)}?", args.force):
        _err("aborted; nothing removed")
        return EXIT_FAILED
    for repo in doomed:
        cache.remove(repo)
    for x in leftovers:
        cache.remove_leftover(x)
    _err(f"freed {_human(total)}")
    return EXIT_OK


_HANDLERS: dict[tuple[str, str], Callable[[argparse.Namespace, object, ModelCache], int]] = {
    ("models", "list"): models_list,
    ("models", "pull"): models_pull,
    ("models", "verify"): models_verify,
    ("models", "rm"): models_rm,
    ("cache", "list"): cache_list,
    ("cache", "clean"): cache_clean,
}


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: python -m core.models.cli [--model-dir DIR] models pull NAME ..."""
    from core.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m core.models.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="model cache root (default: MODEL_DIR or <data-dir>/models)")
    parser.add_argument("--data-dir", help="Switchboard's data directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings({"model_dir": args.model_dir, "data_dir": args.data_dir})
    except BadRequest as exc:
        _err(f"error: {exc.message}")
        return EXIT_USAGE
    return run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
